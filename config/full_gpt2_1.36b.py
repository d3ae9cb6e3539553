# GPT-2 "1.36B": 25L-16H-2048D, 4x GELU MLP, LayerNorm with biases, learned positions, tied embeddings.
# vocab 50,304 (GPT-2's 50,257 padded to a multiple of 64, as nanoGPT does), block 2048.
# Exact count: 1,366,177,792 parameters (+0.45% of 1.36B).
out_dir = "out-gpt2-1.36b"
dataset = "slimpajama_6b_gpt2"

# model
vocab_size = 50304
n_layer = 25
n_head = 16
n_embd = 2048
intermediate_size = 8192
norm = "layernorm"
norm_eps = 1e-5
mlp = "gelu"
position_embedding = "learned"
bias = True
tie_embeddings = True

# batch (the training guide's 2x A6000 tuning run): 4 x 32 x 2048 = 262,144 tokens per step
block_size = 2048
batch_size = 4
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
