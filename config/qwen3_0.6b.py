# Qwen3-0.6B shape: 28L-16H-1024D-3072ff, GQA 8 KV heads, head_dim 128 (not 1024/16 = 64),
# QK-norm, RoPE theta 1e6, vocab 151,936, tied embeddings. 596,049,920 parameters.
out_dir = "out-qwen3-0.6b"
dataset = "slimpajama_6b_qwen3"

vocab_size = 151936
n_layer = 28
n_head = 16
n_kv_head = 8
n_embd = 1024
head_dim = 128
intermediate_size = 3072
norm = "rmsnorm"
norm_eps = 1e-6
mlp = "swiglu"
position_embedding = "rope"
rope_theta = 1000000.0
qk_norm = True
bias = False
tie_embeddings = True

block_size = 4096
batch_size = 4
gradient_accumulation_steps = 32
learning_rate = 3e-4
min_lr = 3e-5
weight_decay = 0.1
beta2 = 0.95
