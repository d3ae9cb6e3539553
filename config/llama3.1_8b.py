# Llama-3.1-8B shape: 32L-32H-4096D-14336ff, GQA 8 KV heads, vocab 128,256, untied,
# RoPE theta 500,000 with the Llama-3.1 frequency scaling. 8,030,261,248 parameters.
# To start from Meta's weights instead of random ones: --init_from=/path/to/Llama-3.1-8B (HF folder).
out_dir = "out-llama3.1-8b"
dataset = "slimpajama_6b_llama3"

vocab_size = 128256
n_layer = 32
n_head = 32
n_kv_head = 8
n_embd = 4096
intermediate_size = 14336
norm = "rmsnorm"
norm_eps = 1e-5
mlp = "swiglu"
position_embedding = "rope"
rope_theta = 500000.0
rope_scaling_factor = 8.0
rope_low_freq_factor = 1.0
rope_high_freq_factor = 4.0
rope_original_max_seq_len = 8192
bias = False
tie_embeddings = False

block_size = 8192
batch_size = 1
gradient_accumulation_steps = 32
learning_rate = 1.5e-4
min_lr = 1e-5
weight_decay = 0.1
beta2 = 0.95
