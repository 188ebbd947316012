# Cross-entropy only, the control for the memory-loss runs: same model, data, batch and schedule
# as config/mem_dino.py and config/mem_l1.py.
#   torchrun --standalone --nproc_per_node=8 train.py config/baseline.py
# Tokens per optimizer step = batch_size x block_size x gradient_accumulation_steps
#                           = 8 x 2048 x 8 = 131,072 (one micro-batch per GPU on 8 GPUs, 8 micro-steps on 1).
out_dir = 'out/baseline'
wandb_log = True
wandb_run_name = 'baseline'
init_from = 'gemma3-270m-gguf'
dataset = 'pg19'

batch_size = 8
block_size = 2048
gradient_accumulation_steps = 8

memory_loss = None             # no memory loss (the same as --no_memory_loss)

max_iters = 2000
warmup_iters = 100
learning_rate = 3e-5
eval_interval = 250
ckpt_interval = 250

dtype = 'auto'
compile = True
