"""
Zero-shot multiple-choice benchmarks of a checkpoint or a pretrained Gemma 3 through lm-evaluation-harness.

    python downstream.py --ckpt=out/ --tasks=arc_challenge,hellaswag --limit=200
    python downstream.py --init_from=gemma3-270m-gguf --task_dir=tasks/    # task YAMLs reading local files
    python downstream.py --help                                           # every setting with its default

lm-eval builds the prompts, the requests and the metrics, and GemmaLM below scores its requests with
our model and our tokenizer. A context is encoded with BOS in front, as transformers' Gemma
tokenizer does by default in lm-eval's HFLM, so both score the same tokens. The choices of one
question share the context, so the context runs once and its KV cache serves every choice.

arc_challenge (allenai/ai2_arc) and hellaswag (Rowan/hellaswag) read their datasets from the
Hugging Face hub, which the datasets library caches after the first run. Without the hub, point
--task_dir at YAML files whose dataset is a local file (dataset_path: json, dataset_kwargs:
data_files), for example a file that includes lm-eval's own task YAML and overrides only those keys.

Other scripts use the Python API:

    lm = GemmaLM(model, tokenizer, batch_size=16)
    report = run_tasks(lm, ['arc_challenge', 'hellaswag'], limit=100)   # -> {task: {acc, acc_norm, ...}}
"""

import importlib.metadata
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from configurator import configure, exit_on_error
from model import GGUF_ALIAS
from perplexity import default_output, evaluate_perplexity, setup_model, write_json

# -----------------------------------------------------------------------------
# settings: `python downstream.py --key=value` overrides any of these (see configurator.py)
ckpt = ''                      # checkpoint file, or a folder of ckpt_*.pt (the newest valid one); '' = use init_from
init_from = GGUF_ALIAS         # weights when ckpt is '': hub id, HF folder, .gguf file or the GGUF alias
tasks = 'arc_challenge,hellaswag'  # comma-separated lm-eval task names
task_dir = ''                  # folder of extra task YAMLs (scanned after lm-eval's; a task of the same name replaces it)
limit = None                   # examples per task: an int, a fraction below 1, or None for all
num_fewshot = 0                # examples in each prompt (0 = zero-shot)
batch_size = 16                # continuations (the choices of one question) scored per forward pass
max_length = 0                 # max tokens per model input; longer inputs lose tokens on the left (0 = max_position_embeddings, as HFLM)
device = 'auto'                # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
dtype = 'auto'                 # auto (bfloat16 on a GPU that supports it, else float32) | float32 | bfloat16
seed = 1234                    # seed of lm-eval's sampling of few-shot examples and of python/numpy/torch
out_json = ''                  # result file ('' = downstream.json in the checkpoint's folder, or out/downstream-{model}.json)

METRICS = ('acc', 'acc_norm')  # what lm-eval's arc_challenge and hellaswag tasks report
LOGITS_PER_FORWARD = 2048      # rows of logits alive at once when scoring choices: 2 GiB in float32 at 262,144 classes

# -----------------------------------------------------------------------------
# lm-eval model class over our Gemma


class GemmaLM(TemplateLM):
    """lm-eval language model that scores requests with our Gemma and our SentencePiece tokenizer.

    loglikelihood: lm-eval's TemplateLM encodes context and continuation; the context is run once
        per question and its KV cache is shared by all continuations.
    loglikelihood_rolling: perplexity.py's windows with stride = window = max_length: disjoint
        windows that each start with BOS, except that the last one is moved back to contain
        max_length tokens. HFLM differs here for Gemma: its tokenizer puts BOS inside the scored text, so HFLM
        also scores a BOS predicted from BOS, and its later windows have no BOS.
    generate_until: greedy decoding only.
    """

    def __init__(self, model, tokenizer, batch_size=16, max_length=None, max_gen_toks=256):
        super().__init__()
        self.model = model.eval()
        self.text_tokenizer = tokenizer  # not `tokenizer`: lm-eval reads HF tokenizer attributes from that name
        self.batch_size = int(batch_size)
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks = max_gen_toks
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self):
        return self.text_tokenizer.eos_id

    @property
    def prefix_token_id(self):
        return self.text_tokenizer.bos_id  # the context of a request whose context is empty

    @property
    def max_length(self):
        return self._max_length

    @property
    def device(self):
        return self._device

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """Encode with BOS in front unless add_special_tokens is False (as HFLM's Gemma tokenizer does)."""
        ids = self.text_tokenizer.encode(string)
        return ids if add_special_tokens is False else [self.text_tokenizer.bos_id] + ids

    def tok_decode(self, tokens):
        return self.text_tokenizer.decode(tokens)

    # --- multiple choice ---

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """Return (sum of log-probabilities, is greedy) of each request's continuation after its context."""
        groups = {}  # context tokens given to the model -> [(request index, continuation tokens)]
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            if not continuation_enc or len(continuation_enc) > self.max_length:
                raise ValueError(f"continuation of {len(continuation_enc)} tokens cannot be scored with "
                                 f"max_length={self.max_length}; it must have 1 to max_length tokens")
            # as HFLM: keep the last max_length + 1 tokens, so a long context loses tokens on the left
            whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
            groups.setdefault(tuple(whole[:-len(continuation_enc)]), []).append((i, continuation_enc))

        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc='loglikelihood', file=sys.stdout)
        for context, members in sorted(groups.items(), key=lambda group: -len(group[0])):
            members.sort(key=lambda member: -len(member[1]))  # longest first: a part pads to its first member
            while members:
                part = self.take_part(members)
                scores = self.score_continuations(list(context), [cont for _, cont in part])
                for (i, _), score in zip(part, scores):
                    results[i] = score
                    self.cache_hook.add_partial('loglikelihood', requests[i][0], score)
                bar.update(len(part))
        bar.close()
        return results

    def take_part(self, members):
        """Remove and return the next continuations to score together: at most batch_size of them, and
        at most LOGITS_PER_FORWARD rows of logits (rows = count x longest continuation)."""
        longest = len(members[0][1])
        count = max(1, min(self.batch_size, LOGITS_PER_FORWARD // longest))
        part = members[:count]
        del members[:count]
        return part

    @torch.no_grad()
    def score_continuations(self, context, continuations):
        """Return [(sum of log-probabilities, is greedy)] of continuations that follow one shared context."""
        last, cache = self.model.forward_cached(torch.tensor([context], device=self.device), num_logits=1)
        longest = max(len(c) for c in continuations)
        if longest > 1:  # every continuation token but the last is an input
            inputs = torch.full((len(continuations), longest - 1), self.text_tokenizer.pad_id, dtype=torch.long)
            for b, cont in enumerate(continuations):
                inputs[b, :len(cont) - 1] = torch.tensor(cont[:-1])
            logits, _ = self.model.forward_cached(inputs.to(self.device), cache.expand(len(continuations)))
        scores = []
        for b, cont in enumerate(continuations):
            rows = last[0] if len(cont) == 1 else torch.cat((last[0], logits[b, :len(cont) - 1]))  # (len(cont), V)
            logprobs = F.log_softmax(rows.float(), dim=-1)
            target = torch.tensor(cont, device=self.device)
            scores.append((logprobs.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())))
        return scores

    # --- rolling log-likelihood and generation ---

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Return the log-likelihood of each whole string, scored in BOS-led windows of max_length tokens."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc='loglikelihood_rolling', file=sys.stdout):
            (string,) = request.args
            ids = self.tok_encode(string, add_special_tokens=False)
            if not ids:
                results.append(0.0)  # nothing to predict in an empty string
                continue
            result = evaluate_perplexity(self.model, [ids], window=self.max_length, stride=self.max_length,
                                         batch_size=self.batch_size)
            results.append(-result['nll'])
            self.cache_hook.add_partial('loglikelihood_rolling', (string,), -result['nll'])
        return results

    def generate_until(self, requests, disable_tqdm=False):
        """Greedily continue each context until a stop string, EOS or max_gen_toks new tokens."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc='generate_until', file=sys.stdout):
            context, gen_kwargs = request.args
            options = dict(gen_kwargs)
            until = options.pop('until', None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.pop('max_gen_toks', self.max_gen_toks))
            if options.get('do_sample') or (options.get('temperature') or 0.0) > 0:
                raise ValueError(f"generate_until asks for sampling ({gen_kwargs}); GemmaLM decodes greedily only, "
                                 f"so use tasks with do_sample=False or temperature=0")
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]  # room for max_new tokens, as HFLM
            text = self.greedy_text(ids, max_new, until)
            results.append(text)
            self.cache_hook.add_partial('generate_until', request.args, text)
        return results

    @torch.no_grad()
    def greedy_text(self, ids, max_new, until):
        """Return the greedy continuation of ids as text, cut before the first stop string."""
        logits, cache = self.model.forward_cached(torch.tensor([ids], device=self.device), num_logits=1)
        new = []
        for _ in range(max_new):
            token = int(logits[0, -1].argmax())
            if token == self.eot_token_id:
                break
            new.append(token)
            if any(stop and stop in self.tok_decode(new) for stop in until):
                break
            logits, cache = self.model.forward_cached(torch.tensor([[token]], device=self.device), cache)
        text = self.tok_decode(new)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

# -----------------------------------------------------------------------------
# running tasks


def task_manager_for(task_names, task_dir=''):
    """Return an lm-eval TaskManager that contains every task name, scanning lm-eval's own tasks only if needed."""
    from lm_eval.tasks import TaskManager
    if task_dir and not Path(task_dir).is_dir():
        raise FileNotFoundError(f"task_dir not found: {task_dir}; pass a folder of lm-eval task YAML files")
    if task_dir:
        local = TaskManager(include_path=task_dir, include_defaults=False)  # skips ~9 s of scanning lm-eval's tasks
        if all(name in local.all_tasks for name in task_names):
            return local
    manager = TaskManager(include_path=task_dir or None)
    unknown = [name for name in task_names if name not in manager.all_tasks]
    if unknown:
        import difflib
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ''
        raise ValueError(f"unknown lm-eval task {unknown[0]!r}; {hint}check --tasks, or add its YAML to --task_dir")
    return manager


def run_tasks(lm, task_names, limit=None, num_fewshot=0, task_dir='', seed=1234, bootstrap_iters=100_000,
              log_samples=False):
    """Evaluate lm on lm-eval tasks; return {'tasks': {name: metrics}, 'lm_eval_version': ..., 'raw': lm-eval's output}.

    Each task's metrics contain acc, acc_stderr, acc_norm, acc_norm_stderr (those the task reports),
    its version and the number of examples scored. log_samples keeps every request and response
    in raw['samples'].
    """
    from lm_eval import simple_evaluate
    manager = task_manager_for(task_names, task_dir)
    try:
        raw = simple_evaluate(model=lm, tasks=list(task_names), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, bootstrap_iters=bootstrap_iters, log_samples=log_samples,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed)
    except ConnectionError as e:  # the datasets library raises it when the hub is unreachable or offline
        raise ValueError(f"a task's dataset must be downloaded from the Hugging Face hub, which failed ({e}); run "
                         f"once where the hub is reachable (datasets caches it), or pass --task_dir with task "
                         f"YAMLs that read local files (dataset_path: json, dataset_kwargs: data_files)") from None
    report = {}
    for name in task_names:
        metrics = raw['results'][name]
        entry = {}
        for metric in METRICS:
            if f'{metric},none' in metrics:
                entry[metric] = metrics[f'{metric},none']
                entry[f'{metric}_stderr'] = metrics.get(f'{metric}_stderr,none')
        entry['version'] = raw['versions'].get(name)
        entry['samples'] = raw['n-samples'][name]['effective']
        report[name] = entry
    return {'tasks': report, 'lm_eval_version': importlib.metadata.version('lm_eval'), 'raw': raw}


def format_metric(value, stderr):
    if value is None:
        return '-'
    if isinstance(stderr, float):
        return f"{value:.4f} ± {stderr:.4f}"
    return f"{value:.4f}"


def print_table(report, header):
    print(header)
    print(f"  {'task':<22} {'version':>7} {'n':>6}   {'acc':>15}   {'acc_norm':>15}")
    for name, entry in report['tasks'].items():
        acc, acc_norm = (format_metric(entry.get(m), entry.get(f'{m}_stderr')) for m in METRICS)
        print(f"  {name:<22} {str(entry['version']):>7} {entry['samples']:>6}   {acc:>15}   {acc_norm:>15}")


if __name__ == '__main__':
    with exit_on_error(ValueError, FileNotFoundError):
        config = configure(globals(), sys.argv[1:], types={'limit': (int, float, type(None))})
        task_names = [t.strip() for t in tasks.split(',') if t.strip()]
        if not task_names:
            raise ValueError("tasks is empty; pass --tasks=arc_challenge,hellaswag or other lm-eval task names")
        if limit is not None and not limit > 0:
            raise ValueError(f"limit={limit} is invalid: expected a positive int, a fraction in (0, 1), or None")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} is invalid: expected a positive int")
        for key in ('max_length', 'num_fewshot'):
            if config[key] < 0:
                raise ValueError(f"{key}={config[key]} is invalid: expected an int >= 0")

        # setup
        model, tokenizer, info = setup_model(ckpt, init_from, device, dtype)
        lm = GemmaLM(model, tokenizer, batch_size=batch_size, max_length=max_length or None)

        # the work
        t0 = time.time()
        report = run_tasks(lm, task_names, limit=limit, num_fewshot=num_fewshot, task_dir=task_dir, seed=seed)
        seconds = time.time() - t0

        # the report
        print_table(report, f"{info['source']}: {num_fewshot}-shot, lm-eval {report['lm_eval_version']}, "
                            f"{seconds:.0f} s")
        result = {'model': info['source'], 'lm_eval_version': report['lm_eval_version'], 'tasks': report['tasks'],
                  'dtype': info['dtype'], 'seconds': round(seconds, 2), 'config': config}
        out_json = out_json or default_output(info, 'downstream')
        write_json(out_json, result)
        print(f"wrote {out_json}")
