# Planned by: python scaling_laws.py plan --flops 1.36e21 --family llama3 --chinchilla
# The lowest predicted loss among llama3 shapes with D/N within 10% of 20 for 1.36e21 training FLOPs:
# 24L-24H-3072D-8448ff GQA(8kv), 3,260,697,600 parameters, 1.9011e+10 FLOPs per token
# (model.py: 6 x matmul weights + 12 x n_layer x n_head x head_dim x seq_len, seq_len 2048)
# -> 71.54B tokens, D/N 21.9, predicted loss 2.3020 (docs/LLAMA3_AND_SCALING_LAW_IMPLEMENTATION.md).
out_dir = "out-plan-llama3-1.36e21-chinchilla"
dataset = "slimpajama_6b_llama3"

# model
vocab_size = 128256
n_layer = 24
n_head = 24
n_kv_head = 8
n_embd = 3072
head_dim = 128
intermediate_size = 8448
norm = "rmsnorm"
norm_eps = 1e-05
mlp = "swiglu"
position_embedding = "rope"
rope_theta = 500000.0
bias = False
tie_embeddings = False

# batch: 8 x 24 x 2048 = 393,216 tokens per step (the training guide's; fit batch_size to memory and keep the product)
block_size = 2048
batch_size = 8
gradient_accumulation_steps = 24

# optimizer and schedule: max_iters steps cover the planned 71.54B tokens
learning_rate = 0.0003
min_lr = 3e-05
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0
warmup_iters = 2000
max_iters = 181928
lr_decay_iters = 181928
