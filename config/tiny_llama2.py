# Tiny LLaMA-2-style model for CPU tests and smoke runs: 4L-4H-128D-352ff, MHA, RoPE 10k, untied.
out_dir = "out-tiny-llama2"
dataset = "shakespeare_char"
vocab_size = 128
n_layer = 4
n_head = 4
n_embd = 128
intermediate_size = 352
norm = "rmsnorm"
mlp = "swiglu"
position_embedding = "rope"
rope_theta = 10000.0
bias = False
tie_embeddings = False
block_size = 128
batch_size = 8
