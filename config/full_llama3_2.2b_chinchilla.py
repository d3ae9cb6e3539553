# LLaMA-3 2.2B "Chinchilla": the grid search under the D ~ 20N constraint (predicted loss 2.351 at
# 61.5B tokens for 1.36e21 FLOPs; docs/LLAMA3_AND_SCALING_LAW_IMPLEMENTATION.md).
# 30L-16H-2048D-7168ff, GQA 8 KV heads, vocab 128,256, untied: 2,224,154,624 parameters.
out_dir = "out-llama3-2.2b-chinchilla"
dataset = "slimpajama_6b_llama3"

# model
vocab_size = 128256
n_layer = 30
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
