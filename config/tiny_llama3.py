# Tiny LLaMA-3-style model for CPU tests and smoke runs: 4L-6H-192D-512ff, GQA 2 KV heads (ratio 3),
# RoPE 500k with Llama-3.1 scaling, untied.
out_dir = "out-tiny-llama3"
dataset = "shakespeare_char"
vocab_size = 128
n_layer = 4
n_head = 6
n_kv_head = 2
n_embd = 192
intermediate_size = 512
norm = "rmsnorm"
mlp = "swiglu"
position_embedding = "rope"
rope_theta = 500000.0
rope_scaling_factor = 8.0
rope_original_max_seq_len = 64
bias = False
tie_embeddings = False
block_size = 128
batch_size = 8
