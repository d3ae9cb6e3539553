# LLaMA-2 "1.36B": 18L-18H-2304D-6144ff, multi-head attention, RoPE theta 10,000, vocab 32,000, untied.
# The training guide calls it 1.36B; the exact count is 1,294,159,104 parameters (1.294B).
out_dir = "out-llama-1.36b"
dataset = "slimpajama_6b_llama"

# model
vocab_size = 32000
n_layer = 18
n_head = 18
n_embd = 2304
intermediate_size = 6144
norm = "rmsnorm"
norm_eps = 1e-5
mlp = "swiglu"
position_embedding = "rope"
rope_theta = 10000.0
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
