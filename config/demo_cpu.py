# The real Gemma 3 270M on a CPU, sized for `make demo`: a few minutes of training on 2 cores.
# Tokens per optimizer step = batch_size x block_size x gradient_accumulation_steps
#                           = 1 x 256 x 1 = 256, so 30 steps see 7,680 tokens.
# memory_offset 128 < block_size 256 gives 127 pairs per window (t = 129..255; t = 128 pairs with BOS).
out_dir = 'out/demo'
init_from = 'gemma3-270m-gguf'

batch_size = 1
block_size = 256
gradient_accumulation_steps = 1

memory_loss = 'dino'
memory_layer = 12              # after block 11, the second of the 270M's three global-attention layers
memory_offset = 128
dino_teacher_temp_warmup_iters = 10

learning_rate = 3e-5
train_embeddings = False       # the tied 262,144 x 640 embedding / LM head stays frozen: its gradient alone
                               # costs ~86 GFLOP per 256-token step, and AdamW state for it 1.3 GB
max_iters = 30
warmup_iters = 5
eval_interval = 30             # evaluate before the first and after the last step
eval_iters = 4                 # 4 windows of 256 tokens
log_interval = 1
ckpt_interval = 30             # one checkpoint, after the last step (2.0 GB: fp32 weights and the AdamW state)
keep_last = 1

device = 'cpu'
dtype = 'auto'                 # bfloat16 autocast where the CPU has native bf16 matmuls, else float32
