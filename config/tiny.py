# A tiny random Gemma for tests and quick checks of the training loop: seconds per run on a CPU.
# Tokens per optimizer step = batch_size x block_size x gradient_accumulation_steps
#                           = 2 x 64 x 2 = 256 (the 2 micro-steps are split over WORLD_SIZE ranks).
# With the Gemma tokenizer most of the time goes to the 262,144-way LM head; the tests pass a
# small SentencePiece tokenizer (--tokenizer=FOLDER) to make steps ~50x faster.
out_dir = 'out/tiny'
init_from = 'scratch'
model_preset = 'custom'
num_hidden_layers = 4
hidden_size = 32
intermediate_size = 64
num_attention_heads = 2
num_key_value_heads = 1
head_dim = 16
sliding_window = 32            # shorter than block_size, so the local layers really are windowed
sliding_window_pattern = 2     # blocks 1 and 3 attend globally

batch_size = 2
block_size = 64
gradient_accumulation_steps = 2

memory_loss = 'dino'
memory_layer = 2               # after block 1, the first global layer
memory_offset = 16
dino_prototypes = 64
dino_hidden_dim = 64
dino_bottleneck_dim = 16
dino_teacher_temp_warmup_iters = 5

learning_rate = 1e-3           # random weights: a pretraining-sized LR
head_learning_rate = 1e-3
max_iters = 10
warmup_iters = 2
eval_interval = 5
eval_iters = 2
log_interval = 1
ckpt_interval = 5

device = 'cpu'
dtype = 'float32'              # exact comparisons in the tests need float32
