# Qwen3 1.8B "optimal": predicted loss 2.340 at 81.7B tokens for a 1.36e21 FLOPs budget
# (docs/LLAMA3_AND_SCALING_LAW_IMPLEMENTATION.md).
# 24L-16H-2048D-6144ff, GQA 8 KV heads, head_dim 128, QK-norm, RoPE theta 1e6, untied.
# vocab_size is 151,936, not the tokenizer's 151,643 BPE ranks: it is the real Qwen3 embedding
# size, it holds the special tokens (<|endoftext|> = 151,643 and up), and it is a multiple of 128.
# 1,830,395,904 parameters.
out_dir = "out-qwen3-1.8b-optimal"
dataset = "slimpajama_6b_qwen3"

# model
vocab_size = 151936
n_layer = 24
n_head = 16
n_kv_head = 8
n_embd = 2048
head_dim = 128
intermediate_size = 6144
norm = "rmsnorm"
norm_eps = 1e-6
mlp = "swiglu"
position_embedding = "rope"
rope_theta = 1000000.0
qk_norm = True
bias = False
tie_embeddings = False

# batch (the training guide's 2x A6000 tuning run): 6 x 32 x 2048 = 393,216 tokens per step
block_size = 2048
batch_size = 6
gradient_accumulation_steps = 32

# optimizer and schedule
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 2000
max_iters = 50000
lr_decay_iters = 50000
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0
