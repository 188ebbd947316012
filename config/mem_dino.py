# DINO memory loss on Gemma 3 270M, sized for one node of 8 GPUs with 80 GB each:
#   torchrun --standalone --nproc_per_node=8 train.py config/mem_dino.py
# Tokens per optimizer step = batch_size x block_size x gradient_accumulation_steps
#                           = 8 x 2048 x 8 = 131,072 (one micro-batch per GPU on 8 GPUs, 8 micro-steps on 1).
# 2000 steps see 262M tokens, about a tenth of PG-19's training split (~1.9B words, so roughly 2.5B
# Gemma tokens; an estimate). On gutenberg (2.2M training tokens) the same run would repeat it ~120 times.
out_dir = 'out/mem_dino'
wandb_log = True
wandb_run_name = 'mem_dino'
init_from = 'gemma3-270m-gguf'
dataset = 'pg19'

batch_size = 8
block_size = 2048
gradient_accumulation_steps = 8

memory_loss = 'dino'
memory_weight = 0.1
memory_layer = 12              # after block 11, the second of the three global-attention layers
memory_offset = 512            # one sliding window back: reachable only through the global layers

max_iters = 2000
warmup_iters = 100
learning_rate = 3e-5
head_learning_rate = 1e-3
eval_interval = 250
ckpt_interval = 250

dtype = 'auto'                 # bfloat16 autocast on GPUs that have it
compile = True
