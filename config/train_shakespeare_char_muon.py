# The quickstart with Muon: config/train_shakespeare_char.py's model and data, with Muon for the blocks'
# 2-D weights (AdamW for the embeddings, norms and biases) at 5x the schedule's lr and 4 Newton-Schulz steps,
# twice the tokens a step (batch 24), a warmup-stable-decay schedule and 375 iterations instead of 2000.
# bench/time_to_quality.py sets it beside nanoGPT's AdamW recipe (config/train_shakespeare_char.py);
# bench/RESULTS.md has the iterations and the time each takes to the AdamW recipe's final val loss.
#   python data/shakespeare_char/prepare.py && python train.py config/train_shakespeare_char_muon.py
out_dir = "out-shakespeare-char-muon"
dataset = "shakespeare_char"
eval_interval = 125  # at the same tokens seen as the AdamW config's 250
eval_iters = 10  # 10 batches of 24: the same 240 val windows as its 20 of 12
log_interval = 10
always_save_checkpoint = False
# a downstream task at the start and the end (0, 375): the true rest of a val line, cut mid-word, among 4
# (prepare.py builds its 500 questions), as in the quickstart
eval_tasks = "shakespeare_line_end"
eval_tasks_interval = 375

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
batch_size = 24  # 1,536 tokens a step: Muon's orthogonalisation costs the same per step, so half as much a token
gradient_accumulation_steps = 1
learning_rate = 1.4e-3  # about sqrt(2) x the AdamW config's 1e-3, for twice the batch
max_iters = 375
lr_decay_iters = 375
min_lr = 1.4e-4
beta2 = 0.99
warmup_iters = 50

compile = False  # at this size compilation costs more than it saves on a CPU
# the recipe (bench/time_to_quality.py's muon_wsd_ns4_b24_375; the lr sweep and the levers are in bench/RESULTS.md)
optimizer = "muon"
muon_lr_scale = 5.0  # Muon's lr: 5 x learning_rate, with match_rms_adamw scaling (optim.py)
muon_ns_steps = 4  # 4 Newton-Schulz steps kept the quality of 5 here, at less cost; 3 did not
lr_schedule = "wsd"
lr_decay_fraction = 0.3  # the peak until iteration 263, then linearly down to min_lr at 375
