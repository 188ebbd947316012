# L1 memory loss on standardized hidden states, Gemma 3 270M, sized like config/mem_dino.py:
#   torchrun --standalone --nproc_per_node=8 train.py config/mem_l1.py
# Tokens per optimizer step = batch_size x block_size x gradient_accumulation_steps
#                           = 8 x 2048 x 8 = 131,072 (one micro-batch per GPU on 8 GPUs, 8 micro-steps on 1).
# 2000 steps see 262M tokens of PG-19 (about a tenth of its training split; an estimate).
out_dir = 'out/mem_l1'
wandb_log = True
wandb_run_name = 'mem_l1'
init_from = 'gemma3-270m-gguf'
dataset = 'pg19'

batch_size = 8
block_size = 2048
gradient_accumulation_steps = 8

memory_loss = 'l1'
memory_weight = 0.1            # standardized |diff| is ~1 per channel at start, xent ~3: the mem term starts near 0.1
memory_layer = 12              # after block 11, the second of the three global-attention layers
memory_offset = 512
memory_norm = 'running'        # raw L1 would fit the few ~1e5 channels alone

max_iters = 2000
warmup_iters = 100
learning_rate = 3e-5
eval_interval = 250
ckpt_interval = 250

dtype = 'auto'
compile = True
