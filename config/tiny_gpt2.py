# Tiny GPT-2-style model for CPU tests and smoke runs: 4L-4H-128D, learned positions, tied.
out_dir = "out-tiny-gpt2"
dataset = "shakespeare_char"
vocab_size = 128
n_layer = 4
n_head = 4
n_embd = 128
norm = "layernorm"
mlp = "gelu"
position_embedding = "learned"
bias = True
tie_embeddings = True
block_size = 128
batch_size = 8
