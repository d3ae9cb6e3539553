# LLaMA-3 1.5B "optimal": the shape with the lowest predicted loss (2.335 at 101.9B tokens) for a
# 1.36e21 FLOPs budget in the backward N-D grid search (docs/LLAMA3_AND_SCALING_LAW_IMPLEMENTATION.md).
# 18L-16H-2048D-7168ff, GQA 8 KV heads, vocab 128,256, untied: 1,544,628,224 parameters.
out_dir = "out-llama3-1.5b-optimal"
dataset = "slimpajama_6b_llama3"

# model
vocab_size = 128256
n_layer = 18
n_head = 16
n_kv_head = 8
n_embd = 2048
intermediate_size = 7168
norm = "rmsnorm"
norm_eps = 1e-5
mlp = "swiglu"
position_embedding = "rope"
rope_theta = 500000.0
bias = False
tie_embeddings = False

# batch (the training guide's 2x A6000 tuning run): 8 x 24 x 2048 = 393,216 tokens per step
block_size = 2048
batch_size = 8
gradient_accumulation_steps = 24

# optimizer and schedule
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 2000
max_iters = 50000
lr_decay_iters = 50000
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0
