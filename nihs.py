"""
Needle in a haystack: does a model recall a fact planted far back in a long text?

    python nihs.py --ckpt=out/                              # newest checkpoint in out/
    python nihs.py --init_from=gemma3-270m-gguf             # the pretrained baseline
    python nihs.py --lengths=256,512,1024 --depths=0,50,100 --n=50 --needle=city
    python nihs.py --method=probe --layers=6,12             # linear probe on frozen hidden states
    python nihs.py --compare a/results.json b/results.json  # b against a, with intervals
    python nihs.py --compare gemma3-270m-gguf out/ --n=20   # evaluate both models first, then compare

A trial is a prompt of at most `length` tokens. It contains BOS, a haystack cut from held-out text at
sentence boundaries, four needles of one kind planted at sentence boundaries, and a question about
the target needle's key. The three distractor needles have other keys and other values:

    <bos>...haystack... The access code for the amber vault is 0c1f...e2. ...haystack...

    Question: What is the access code for the amber vault?
    Answer: The access code for the amber vault is

The target goes at the sentence boundary nearest to `depth`% of the haystack's tokens; each
distractor goes at another boundary drawn uniformly at random, so neither "a value I saw" nor
"the value near the requested depth" gives the answer. Every length also runs two controls:
'adjacent' (target right before the question, as at depth 100) and 'none' (nothing planted, so
accuracy is at chance).

Method `mc` scores the four values as continuations of the prompt (one forward pass over the
prompt, its KV cache shared by the four options). Method `probe` fits a logistic regression on
the hidden state at the last prompt token to name the target among a closed set of C values.

Other scripts use the Python API (settings not given keep the defaults below):

    results = run_nihs(model, tokenizer, {'lengths': [256, 512], 'depths': [0, 50, 100], 'n': 10})
    save_results(results, 'out/nihs')                    # results.json, heatmap.png, distance.png
    print(format_table(results))
    comparison = compare_results(results_a, results_b)   # per cell: both accuracies, b - a and its interval
    print(format_comparison(comparison))
    evaluate({'ckpt': 'out/', 'n': 10})                  # what the command line runs: load, run, write, print
"""

import json
import math
import os
import random
import re
import sys
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as model_py
from configurator import configure, exit_on_error
from model import GGUF_ALIAS, Gemma, check_dtype
from perplexity import pick_device

# -----------------------------------------------------------------------------
# settings: `python nihs.py --key=value` overrides any of these (see configurator.py)
init_from = GGUF_ALIAS         # weights when --ckpt is not set: hub id, HF folder, .gguf file or 'gemma3-270m-gguf'
ckpt = ''                      # checkpoint file, or a folder whose newest valid ckpt_*.pt is used (overrides init_from)
tokenizer = ''                 # tokenizer source; '' = the checkpoint's training tokenizer, else init_from
dataset = 'gutenberg'          # haystack source as data.py names it: gutenberg | pg19 | wikitext103 | a folder
split = 'test'                 # haystacks come from this split, which training never reads
lengths = [256, 512, 1024, 2048, 4096]  # prompt lengths in tokens, BOS and question included (upper bounds)
depths = [0, 25, 50, 75, 100]  # target depth: % of the haystack's tokens that come before the target needle
n = 50                         # trials per (length, depth) cell; the two controls get n trials per length too
needle = 'uuid'                # uuid: "The access code for <key> is <uuid4>." | city: "<name> lives in <city>."
method = 'mc'                  # mc: score the 4 values as continuations | probe: linear probe on hidden states
prefix_tokens = 4              # mc with uuid needles: acc_prefix scores only the first this many value tokens
layers = [6, 12]               # probe: hidden-state indices (0 = embeddings, i = after block i-1, L = final norm)
probe_classes = 16             # probe: size C of the closed set of needle values (chance = 1/C)
probe_train_n = 0              # probe: training trials per cell (0 = n), from haystacks disjoint from the test ones
seed = 1337                    # every trial, needle and split follows from the seed alone
out = ''                       # output folder; '' = <checkpoint folder>/nihs, or out/nihs/<model name> for init_from
device = 'auto'                # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
dtype = 'float32'              # float32 | bfloat16 (float16 overflows Gemma 3's activations)
compare = []                   # two results.json files (or model sources to evaluate first): compare b against a
SETTINGS = ['init_from', 'ckpt', 'tokenizer', 'dataset', 'split', 'lengths', 'depths', 'n', 'needle', 'method',
            'prefix_tokens', 'layers', 'probe_classes', 'probe_train_n', 'seed', 'out', 'device', 'dtype', 'compare']

# -----------------------------------------------------------------------------
# constants

NEEDLE_KINDS = ('uuid', 'city')
METHODS = ('mc', 'probe')
CONTROLS = ('adjacent', 'none')  # depth labels of the two control cells
CHOICES = 4                      # the target and three distractors
Z95 = 1.959963984540054          # standard normal quantile for a two-sided 95% interval
JOIN_MARGIN = 4                  # tokens kept free for merges where needles and question meet the haystack
SPAN_SLACK = 256                 # extra tokens read around a haystack so a partial first sentence can be dropped
CUT_ATTEMPTS = 20                # haystack draws before accepting one that fills less than MIN_FILL of its budget
MIN_FILL = 0.9
RESULTS_FORMAT = 'nihs-results-1'
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}

# Keys and values. Names and cities were chosen not to occur in the Shakespeare plays (no Olivia,
# Venice, Rome or Athens), so the haystack never mentions a needle's key or value by chance.
ADJECTIVES = ['amber', 'silver', 'crimson', 'hidden', 'northern', 'copper', 'velvet', 'frozen', 'golden', 'hollow',
              'quiet', 'scarlet', 'ivory', 'jade', 'marble', 'cobalt', 'dusty', 'iron', 'lunar', 'misty',
              'orange', 'rusty', 'sunken', 'violet']
NOUNS = ['vault', 'archive', 'garage', 'locker', 'server', 'warehouse', 'laboratory', 'cabin', 'satellite',
         'greenhouse', 'elevator', 'terminal', 'bunker', 'studio', 'pantry', 'hangar', 'observatory', 'depot',
         'workshop', 'gallery', 'basement', 'attic', 'lighthouse', 'kiosk']
NAMES = ['Priya', 'Kenji', 'Mateo', 'Aisha', 'Lars', 'Ingrid', 'Tomasz', 'Chloe', 'Ravi', 'Yuki', 'Amara', 'Diego',
         'Freya', 'Omar', 'Leila', 'Hiroshi', 'Nadia', 'Sven', 'Zara', 'Kofi', 'Marco', 'Anya', 'Tariq', 'Mei',
         'Jonas', 'Ines', 'Dmitri', 'Siobhan', 'Hugo', 'Rafael', 'Astrid', 'Nikhil']
CITIES = ['Tokyo', 'Nairobi', 'Lima', 'Toronto', 'Mumbai', 'Cairo', 'Sydney', 'Oslo', 'Seoul', 'Jakarta', 'Lagos',
          'Santiago', 'Montreal', 'Istanbul', 'Bangkok', 'Quito', 'Dublin', 'Helsinki', 'Manila', 'Karachi',
          'Havana', 'Reykjavik', 'Marrakesh', 'Hanoi', 'Bogota', 'Auckland', 'Vancouver', 'Chicago', 'Shanghai',
          'Warsaw', 'Zurich', 'Buenos Aires']

# A sentence ends at . ! or ?, optionally followed by closing quotes or brackets, then whitespace or
# the end of the text. Speaker labels of plays ("Ber.") count too: they end a line just as a sentence does.
SENTENCE_END = re.compile(r"[.!?]['\")\]]*(?=\s|$)")


# -----------------------------------------------------------------------------
# statistics

def wilson_interval(k, n, z=Z95):
    """Return the Wilson score interval (low, high) for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At k = 0 or k = n, rounding can leave a bound a hair on the wrong side of p (e.g. low = 1e-17 at k = 0)
    return min(p, max(0.0, center - half)), max(p, min(1.0, center + half))


def newcombe_interval(k1, n1, k2, n2, z=Z95):
    """Return Newcombe's hybrid score interval (low, high) for p2 - p1 of two independent proportions.

    Method 10 of Newcombe (1998), Statistics in Medicine 17:873-890: the Wilson intervals of both
    proportions combined in quadrature."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    diff = p2 - p1
    low = diff - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    high = diff + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return low, high


def proportion(k, n):
    """Return the summary of k hits in n trials: accuracy and its 95% Wilson interval."""
    low, high = wilson_interval(k, n)
    return {'k': int(k), 'n': int(n), 'acc': k / n if n else float('nan'), 'low': low, 'high': high}


# -----------------------------------------------------------------------------
# needles

class Needle(NamedTuple):
    key: str     # what the question names: 'the amber vault' or 'Priya'
    value: str   # what the model must recall: a uuid or a city
    text: str    # the planted sentence


def needle_sentence(kind, key, value):
    return f"The access code for {key} is {value}." if kind == 'uuid' else f"{key} lives in {value}."


def question_text(kind, key):
    """Return the text that follows the haystack: a question and the start of its answer."""
    if kind == 'uuid':
        return f"\n\nQuestion: What is the access code for {key}?\nAnswer: The access code for {key} is"
    return f"\n\nQuestion: Where does {key} live?\nAnswer: {key} lives in"


def random_uuid(rng):
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def draw_needles(kind, rng, values=None):
    """Draw CHOICES needles with distinct keys and distinct values; the first is the target.

    `values` is the closed set to draw values from (the probe's); None draws fresh uuids or any city."""
    if kind == 'uuid':
        keys = [f"the {adjective} {noun}" for adjective, noun in
                zip(rng.sample(ADJECTIVES, CHOICES), rng.sample(NOUNS, CHOICES))]
        picked = rng.sample(values, CHOICES) if values else [random_uuid(rng) for _ in range(CHOICES)]
    else:
        keys = rng.sample(NAMES, CHOICES)
        picked = rng.sample(values or CITIES, CHOICES)
    return [Needle(key, value, needle_sentence(kind, key, value)) for key, value in zip(keys, picked)]


def probe_values(kind, classes, seed):
    """Return the probe's closed set of `classes` values: the first cities of CITIES, or seeded uuids."""
    if kind == 'city':
        return CITIES[:classes]
    rng = random.Random(f"nihs/{seed}/probe-values")
    return [random_uuid(rng) for _ in range(classes)]


# -----------------------------------------------------------------------------
# haystacks

class Document(NamedTuple):
    title: str
    text: str
    num_tokens: int


class Haystack(NamedTuple):
    text: str         # whole sentences of one document, no leading whitespace
    bounds: list      # char offsets where a needle may go: 0, after each sentence, len(text)
    cum_tokens: list  # tokens of text[:bounds[j]], counted sentence by sentence
    title: str        # the document it was cut from
    start_char: int   # offset of the span it was cut from, in the document's text

    @property
    def num_tokens(self):
        return self.cum_tokens[-1]


def sentence_ends(text):
    """Return the char offset just after every sentence end in `text`."""
    return [m.end() for m in SENTENCE_END.finditer(text)]


def make_haystack(tokenizer, text, title='', start_char=0):
    """Build a Haystack from text that starts at a sentence start and ends at a sentence end."""
    bounds = sorted({0, *sentence_ends(text), len(text)})
    counts = [len(tokenizer.encode(text[a:b])) for a, b in zip(bounds, bounds[1:])]
    return Haystack(text, bounds, [0, *np.cumsum(counts).tolist()], title, start_char)


def region_of(doc, region):
    """Return the (first, last) char offsets and the token count of a document's region (fractions)."""
    first, last = int(region[0] * len(doc.text)), int(region[1] * len(doc.text))
    return first, last, int((region[1] - region[0]) * doc.num_tokens)


def check_haystack_room(docs, budget, region, where):
    """Raise ValueError when no document region has room for `budget` tokens plus whole-sentence cuts."""
    longest = max((region_of(doc, region)[2] for doc in docs), default=0)
    if longest < budget + SPAN_SLACK:
        raise ValueError(f"a haystack of {budget} tokens does not fit: the longest document region in {where} "
                         f"has {longest} tokens (need {budget + SPAN_SLACK}); use shorter --lengths or a "
                         f"--dataset with longer documents")


def cut_haystack(tokenizer, docs, budget, rng, region=(0.0, 1.0)):
    """Cut a haystack of at most `budget` tokens of whole sentences from a random place in `docs`.

    Documents are drawn in proportion to how many start positions they offer. `region` restricts
    the draw to a fraction of every document, so the probe can train and test on different halves."""
    spans = []
    for doc in docs:
        first, last, tokens = region_of(doc, region)
        if tokens >= budget + SPAN_SLACK:
            chars_per_token = len(doc.text) / max(doc.num_tokens, 1)
            span_chars = int((budget + SPAN_SLACK) * chars_per_token * 1.5)  # 1.5: local text can be denser
            spans.append((doc, first, last, min(span_chars, last - first)))
    if not spans:
        raise ValueError(f"no document has room for a haystack of {budget} tokens; use shorter --lengths")
    weights = [last - first - span + 1 for _, first, last, span in spans]
    best = None
    for _ in range(CUT_ATTEMPTS):
        doc, first, last, span = rng.choices(spans, weights=weights)[0]
        start = rng.randrange(first, last - span + 1)
        text = doc.text[start:start + span]
        ends = sentence_ends(text)
        if not ends:
            continue
        head = ends[0] + (len(text[ends[0]:]) - len(text[ends[0]:].lstrip()))  # skip the partial first sentence
        text = text[head:]
        limit = len(tokenizer.decode(tokenizer.encode(text)[:budget]))
        fitting = [e for e in sentence_ends(text) if e <= limit]
        if not fitting:
            continue
        haystack = make_haystack(tokenizer, text[:fitting[-1]], doc.title, start + head)
        if best is None or haystack.num_tokens > best.num_tokens:
            best = haystack
        if haystack.num_tokens >= MIN_FILL * budget:
            break
    if best is None:
        raise ValueError(f"found no sentence boundary in {CUT_ATTEMPTS} haystack draws of {budget} tokens; "
                         f"use a --dataset with punctuated text")
    return best


# -----------------------------------------------------------------------------
# trials: needles planted in a haystack, tokenized once

class Trial(NamedTuple):
    kind: str            # needle kind: uuid or city
    length: int          # requested upper bound on the prompt's tokens
    depth: object        # int percent, 'adjacent' or 'none'
    index: int
    needles: list        # [target, distractor, distractor, distractor]; none planted when depth == 'none'
    question: str
    prompt: str          # text after BOS: haystack with needles, then the question
    ids: list            # [BOS] + tokens of prompt
    haystack: Haystack
    target_bound: int    # index into haystack.bounds of the target needle (None when nothing is planted)
    positions: list      # per planted needle (same order as needles): (first token, one past last token)
    question_pos: int    # token of the question's first word


def char_to_token(tokenizer, ids, char):
    """Return the index in `ids` of the token that covers char offset `char` of decode(ids).

    Found by bisection on the length of decoded prefixes, so it needs nothing but decode()."""
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid + 1])) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo


def depth_bound(haystack, depth):
    """Return the index of the boundary whose token offset is nearest `depth`% of the haystack."""
    goal = depth / 100 * haystack.num_tokens
    return min(range(len(haystack.bounds)), key=lambda j: (abs(haystack.cum_tokens[j] - goal), j))


def place_needles(haystack, target_bound, rng, adjacent=False):
    """Return {boundary index: [needle indices in text order]} with the target (needle 0) at target_bound.

    Distractors take three other boundaries drawn uniformly; a haystack with fewer free boundaries
    stacks needles at shared ones. Needles sharing a boundary are ordered at random, except that
    an adjacent target always comes last."""
    others = [j for j in range(len(haystack.bounds)) if j != target_bound]
    if len(others) >= CHOICES - 1:
        spots = rng.sample(others, CHOICES - 1)
    else:
        spots = rng.choices(range(len(haystack.bounds)), k=CHOICES - 1)
    placement = {target_bound: [0]}
    for needle_index, j in enumerate(spots, start=1):
        placement.setdefault(j, []).append(needle_index)
    for j, group in placement.items():
        rng.shuffle(group)
        if adjacent and j == target_bound:
            group.remove(0)
            group.append(0)
    return placement


def assemble(haystack, needles, placement):
    """Insert needles into the haystack text; return (text, [(char start, char end)] per needle).

    A needle follows the sentence before it after one space. Needles at boundary 0 open the text,
    with one space between them and its first sentence."""
    text, spans = '', [None] * len(needles)
    bounds = haystack.bounds
    for j, bound in enumerate(bounds):
        if j:
            text += haystack.text[bounds[j - 1]:bound]
        for k in placement.get(j, []):
            if text:
                text += ' '
            spans[k] = (len(text), len(text) + len(needles[k].text))
            text += needles[k].text
        if j == 0 and text and haystack.text:
            text += ' '
    return text, spans


def build_trial(tokenizer, haystack, needles, kind, depth, rng, length=0, index=0):
    """Plant the needles (none when depth == 'none') and tokenize the prompt once."""
    if depth == 'none':
        target_bound, placement, planted = None, {}, []
    else:
        adjacent = depth == 'adjacent'
        target_bound = len(haystack.bounds) - 1 if adjacent else depth_bound(haystack, depth)
        placement = place_needles(haystack, target_bound, rng, adjacent)
        planted = needles
    body, spans = assemble(haystack, planted, placement)
    question = question_text(kind, needles[0].key)
    prompt = body + question
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    text_ids = ids[1:]
    positions = [(1 + char_to_token(tokenizer, text_ids, a), 2 + char_to_token(tokenizer, text_ids, b - 1))
                 for a, b in spans]
    question_pos = 1 + char_to_token(tokenizer, text_ids, len(body) + len(question) - len(question.lstrip()))
    return Trial(kind, length, depth, index, needles, question, prompt, ids, haystack, target_bound, positions,
                 question_pos)


def content_rng(seed, purpose, length, index):
    """Return the generator of a trial's needles: one per (seed, purpose, length, index), shared by depths."""
    return random.Random(f"nihs/{seed}/{purpose}/{length}/{index}")


def make_trial(tokenizer, docs, kind, length, depth, index, seed, purpose='mc', values=None, region=(0.0, 1.0)):
    """Draw trial `index` of a (length, depth) cell; the same arguments always give the same trial.

    The needles and the haystack depend on (seed, purpose, length, index) only, so the cells of one
    length share them and differ only in where the needles sit. The 'none' control has a longer
    haystack (no needle tokens to make room for) and so a different one."""
    needles = draw_needles(kind, content_rng(seed, purpose, length, index), values)
    question_tokens = len(tokenizer.encode(question_text(kind, needles[0].key)))
    needle_tokens = 0 if depth == 'none' else sum(len(tokenizer.encode(' ' + nd.text)) for nd in needles)
    budget = length - 1 - question_tokens - needle_tokens - JOIN_MARGIN
    if budget < 1:
        raise ValueError(f"length {length} is too short: BOS, the question and {CHOICES} {kind} needles take "
                         f"{length - budget} tokens; use --lengths of at least {length - budget + 32}")
    for shrink in range(0, budget, 8):  # rarely needed: merges at the joins can add a token or two
        haystack_rng = random.Random(f"nihs/{seed}/{purpose}/{length}/{index}/haystack")
        haystack = cut_haystack(tokenizer, docs, budget - shrink, haystack_rng, region)
        place_rng = random.Random(f"nihs/{seed}/{purpose}/{length}/{depth}/{index}/place")
        trial = build_trial(tokenizer, haystack, needles, kind, depth, place_rng, length, index)
        if len(trial.ids) <= length:
            return trial
    raise ValueError(f"could not fit a prompt into {length} tokens; use a larger length")


def trial_record(trial):
    """Return the JSON-ready facts of a trial: where everything landed, in tokens."""
    hay = trial.haystack
    record = {'length': trial.length, 'depth': trial.depth, 'index': trial.index, 'prompt_len': len(trial.ids),
              'haystack_tokens': hay.num_tokens, 'document': hay.title, 'start_char': hay.start_char,
              'key': trial.needles[0].key, 'target': trial.needles[0].value,
              'distractors': [nd.value for nd in trial.needles[1:]], 'question_pos': trial.question_pos}
    if trial.positions:
        first, end = trial.positions[0]
        record.update({'needle_pos': first, 'needle_end': end, 'distance': trial.question_pos - end,
                       'depth_actual': hay.cum_tokens[trial.target_bound] / max(hay.num_tokens, 1),
                       'distractor_pos': [p[0] for p in trial.positions[1:]]})
    return record


def grid(settings):
    """Return the cells [(length, depth)] of a run: each length's depths, then its two controls."""
    return [(length, depth) for length in settings['lengths'] for depth in [*settings['depths'], *CONTROLS]]


# -----------------------------------------------------------------------------
# method mc: the four values scored as continuations of the prompt

def common_prefix(a, b):
    k = 0
    for x, y in zip(a, b):
        if x != y:
            break
        k += 1
    return k


def split_continuations(tokenizer, prompt_ids, prompt, continuations):
    """Return (shared prefix length, token ids of each continuation).

    Each continuation is tokenized together with the prompt and split where its tokens stop
    agreeing with the prompt's, as lm-eval does. So a token that merges across the join is scored
    as part of the continuation rather than sliced in half. The prefix shared by all options is
    run once. Every continuation keeps at least one token because it adds characters."""
    wholes = [[tokenizer.bos_id] + tokenizer.encode(prompt + c) for c in continuations]
    shared = min(common_prefix(prompt_ids, w) for w in wholes)
    conts = [w[shared:] for w in wholes]
    assert shared >= 1, "the prompt and a continuation share no tokens, not even BOS"
    assert all(conts), "a continuation tokenized to nothing after the shared prompt"
    return shared, conts


@torch.no_grad()
def continuation_logprobs(model, prefix, conts, pad_id=0):
    """Return per continuation the log-probability of each of its tokens after `prefix`.

    The prefix runs once and keeps its KV cache. The continuations then run on that cache as one
    right-padded batch, and because attention is causal the padding never reaches a scored position."""
    device = model.embed_tokens.weight.device
    idx = torch.tensor([prefix], dtype=torch.long, device=device)
    logits, cache = model.forward_cached(idx, num_logits=1)                        # (1, 1, V)
    first = torch.log_softmax(logits[0, -1].float(), dim=-1)
    scores = [[first[c[0]].item()] for c in conts]
    width = max(len(c) for c in conts) - 1
    if width > 0:
        batch = torch.full((len(conts), width), pad_id, dtype=torch.long, device=device)
        targets = torch.zeros((len(conts), width), dtype=torch.long, device=device)
        for i, c in enumerate(conts):
            if len(c) > 1:
                batch[i, :len(c) - 1] = torch.tensor(c[:-1])
                targets[i, :len(c) - 1] = torch.tensor(c[1:])
        logits, _ = model.forward_cached(batch, cache.expand(len(conts)))         # (4, width, V)
        logits = logits.float()
        picked = logits.gather(-1, targets[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
        for i, c in enumerate(conts):
            scores[i] += picked[i, :len(c) - 1].tolist()
    return scores


def option_prefix_score(tokenizer, cont, logprobs, count):
    """Sum the log-probabilities of the first `count` value tokens (a lone leading space token is skipped)."""
    skip = 1 if len(cont) > 1 and not tokenizer.decode(cont[:1]).strip() else 0
    return sum(logprobs[skip:skip + count])


def score_trial(model, tokenizer, trial, prefix_count=4, options=None):
    """Score the four values of a trial; return the metrics record.

    acc: the target has the highest summed log-probability. acc_norm: the highest log-probability
    per character of the continuation (lm-eval's acc_norm). acc_prefix (uuid needles): the highest
    score over the first `prefix_count` value tokens. Options are scored independently, so their
    order changes nothing; a tie counts as a miss."""
    values = options or sorted(nd.value for nd in trial.needles)
    continuations = [' ' + v for v in values]
    shared, conts = split_continuations(tokenizer, trial.ids, trial.prompt, continuations)
    logprobs = continuation_logprobs(model, trial.ids[:shared], conts, getattr(tokenizer, 'pad_id', 0) or 0)
    target = values.index(trial.needles[0].value)
    sums = [sum(lp) for lp in logprobs]
    norms = [s / len(c) for s, c in zip(sums, continuations)]
    scores = {'acc': sums, 'acc_norm': norms}
    if trial.kind == 'uuid':
        scores['acc_prefix'] = [option_prefix_score(tokenizer, c, lp, prefix_count) for c, lp in zip(conts, logprobs)]
    hits = {metric: is_strict_max(s, target) for metric, s in scores.items()}
    return {'options': values, 'scores': scores, 'option_tokens': [len(c) for c in conts],
            'join_shift': len(trial.ids) - shared, 'hits': hits}


def is_strict_max(scores, target):
    return all(scores[target] > s for i, s in enumerate(scores) if i != target)


# -----------------------------------------------------------------------------
# method probe: logistic regression on the frozen hidden state at the last prompt token

@torch.no_grad()
def last_token_hidden(model, ids, layers):
    """Return {layer: (C,) float32 numpy} hidden states at the last token (blocks past the deepest skipped)."""
    device = model.embed_tokens.weight.device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    _, _, hidden = model(idx, hidden_layers=layers, return_logits=False)
    return {layer: hidden[layer][0, -1].float().cpu().numpy() for layer in layers}


def fit_probe(features, labels, seed):
    """Fit a standardized multinomial logistic regression (standardizing tames Gemma's few huge channels).

    The L2 strength C=0.1 is fixed, not tuned per run, so the probe and its control get the same capacity."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
    return probe.fit(np.stack(features), np.asarray(labels))


# -----------------------------------------------------------------------------
# running a grid

def resolve_settings(settings=None):
    """Return the module defaults updated with `settings` (the API's way to pass settings)."""
    resolved = {k: globals()[k] for k in SETTINGS}
    resolved.update(settings or {})
    return resolved


def run_nihs(model, tokenizer, settings=None, docs=None, progress=True, identity=None):
    """Run the whole grid of `settings` on a model and return the results dict (see save_results).

    `tokenizer` needs encode(text) without BOS, decode(ids) and bos_id (data.Tokenizer). `docs`
    are the haystack Documents; None loads the settings' dataset split with data.py. `identity`
    describes the model in the results ('name' labels plots and comparisons)."""
    settings = resolve_settings(settings)
    check_settings(settings)
    check_model_fits(model, tokenizer, settings)
    if docs is None:
        docs = load_documents(settings['dataset'], settings['split'], getattr(tokenizer, 'source', '') or GGUF_ALIAS)
    check_grid_fits(tokenizer, docs, settings)
    t0 = time.time()
    was_training = model.training
    model.eval()
    try:
        if settings['method'] == 'mc':
            trials = run_mc(model, tokenizer, docs, settings, progress)
        else:
            trials = run_probe(model, tokenizer, docs, settings, progress)
    finally:
        model.train(was_training)
    identity = identity or {'name': 'model', 'num_params': model.num_params(), 'config': model.config.to_dict()}
    return summarize(trials, settings, time.time() - t0, identity)


def run_mc(model, tokenizer, docs, settings, progress):
    cells = grid(settings)
    bar = tqdm(total=len(cells) * settings['n'], desc='nihs mc', unit='trial', disable=not progress,
               file=sys.stdout)
    records = []
    for length, depth in cells:
        for i in range(settings['n']):
            t0 = time.time()
            trial = make_trial(tokenizer, docs, settings['needle'], length, depth, i, settings['seed'])
            record = trial_record(trial)
            record.update(score_trial(model, tokenizer, trial, settings['prefix_tokens']))
            record['seconds'] = time.time() - t0
            records.append(record)
            bar.update()
        bar.set_postfix(cell=f"{length}/{depth}")
    bar.close()
    return records


def run_probe(model, tokenizer, docs, settings, progress):
    """Collect hidden states on training and test haystacks (first and second half of every document),
    fit one probe per layer on the training trials of all needle cells, and score every test trial."""
    kind, layers, seed = settings['needle'], sorted(set(settings['layers'])), settings['seed']
    values = probe_values(kind, settings['probe_classes'], seed)
    n_train = probe_train_count(settings)
    jobs = [('train', length, depth, i, (0.0, 0.5)) for length, depth in grid(settings) if depth != 'none'
            for i in range(n_train)]
    jobs += [('test', length, depth, i, (0.5, 1.0)) for length, depth in grid(settings) for i in range(settings['n'])]
    records = {'train': [], 'test': []}
    features = {'train': [], 'test': []}
    for part, length, depth, i, region in tqdm(jobs, desc='nihs probe', unit='trial', disable=not progress,
                                               file=sys.stdout):
        t0 = time.time()
        trial = make_trial(tokenizer, docs, kind, length, depth, i, seed, f"probe-{part}", values, region)
        record = trial_record(trial)
        record['label'] = values.index(trial.needles[0].value)
        features[part].append(last_token_hidden(model, trial.ids, layers))
        record['seconds'] = time.time() - t0
        records[part].append(record)

    rng = np.random.default_rng(seed)
    train_labels = [r['label'] for r in records['train']]
    test_labels = np.array([r['label'] for r in records['test']])
    control_train = rng.permutation(train_labels)  # the control task: the same probe on shuffled labels
    control_test = rng.permutation(test_labels)
    for layer in layers:
        train_x = [f[layer] for f in features['train']]
        test_x = np.stack([f[layer] for f in features['test']])
        predicted = fit_probe(train_x, train_labels, seed).predict(test_x)
        control = fit_probe(train_x, control_train, seed).predict(test_x)
        for record, pred, label, cpred, clabel in zip(records['test'], predicted, test_labels, control,
                                                      control_test):
            record.setdefault('hits', {})[f"probe_l{layer}"] = bool(pred == label)
            record['hits'][f"control_l{layer}"] = bool(cpred == clabel)
            record.setdefault('predicted', {})[f"l{layer}"] = values[int(pred)]
    return records['test']


# -----------------------------------------------------------------------------
# aggregates

def summarize(trials, settings, seconds, identity):
    """Return the results dict: settings, every trial, and per cell the accuracy of each metric."""
    metrics = list(trials[0]['hits']) if trials else []
    cells = []
    for length, depth in grid(settings):
        rows = [t for t in trials if t['length'] == length and t['depth'] == depth]
        if not rows:
            continue
        cell = {'length': length, 'depth': depth, 'n': len(rows),
                'metrics': {m: proportion(sum(t['hits'][m] for t in rows), len(rows)) for m in metrics},
                'mean_prompt_len': float(np.mean([t['prompt_len'] for t in rows])),
                'seconds_per_trial': float(np.mean([t['seconds'] for t in rows]))}
        distances = [t['distance'] for t in rows if 'distance' in t]
        if distances:
            cell['mean_distance'] = float(np.mean(distances))
        if settings['method'] == 'probe':
            cell['selectivity'] = {f"l{layer}": cell['metrics'][f"probe_l{layer}"]['acc']
                                   - cell['metrics'][f"control_l{layer}"]['acc'] for layer in settings['layers']}
        cells.append(cell)
    chance = 1 / CHOICES if settings['method'] == 'mc' else 1 / settings['probe_classes']
    primary = 'acc' if settings['method'] == 'mc' else f"probe_l{settings['layers'][0]}"  # the first listed layer
    per_length = {str(length): float(np.mean([t['seconds'] for t in trials if t['length'] == length]))
                  for length in settings['lengths']}
    return {'format': RESULTS_FORMAT, 'settings': {k: settings[k] for k in SETTINGS if k in settings},
            'model': identity, 'method': settings['method'],
            'needle': settings['needle'], 'chance': chance, 'primary_metric': primary, 'metrics': metrics,
            'cells': cells, 'seconds': seconds, 'seconds_per_trial_by_length': per_length, 'trials': trials}


def cell_label(depth):
    return f"{depth}%" if isinstance(depth, int) else depth


def format_table(results):
    """Return the results table: one row per cell, accuracy with its 95% Wilson interval per metric."""
    metrics = [m for m in results['metrics'] if not m.startswith('control_')]
    header = f"{'length':>6} {'depth':>8} " + ' '.join(f"{m:>22}" for m in metrics)
    if results['method'] == 'probe':
        header += ' ' + ' '.join(f"{'sel l' + m.split('_l')[1]:>8}" for m in metrics)
    header += f" {'n':>4} {'tokens':>6} {'distance':>8} {'s/trial':>7}"
    lines = [header]
    for cell in results['cells']:
        line = f"{cell['length']:>6} {cell_label(cell['depth']):>8} "
        line += ' '.join(f"{format_proportion(cell['metrics'][m]):>22}" for m in metrics)
        if results['method'] == 'probe':
            line += ' ' + ' '.join(f"{cell['selectivity']['l' + m.split('_l')[1]]:>+8.2f}" for m in metrics)
        distance = f"{cell['mean_distance']:.0f}" if 'mean_distance' in cell else '-'
        line += f" {cell['n']:>4} {cell['mean_prompt_len']:>6.0f} {distance:>8} {cell['seconds_per_trial']:>7.2f}"
        lines.append(line)
    lines.append(f"chance {results['chance']:.3f}; intervals are 95% Wilson score intervals; distance = tokens "
                 f"between the target needle and the question")
    return '\n'.join(lines)


def format_proportion(p):
    return f"{p['acc']:.2f} [{p['low']:.2f}, {p['high']:.2f}]"


# -----------------------------------------------------------------------------
# comparison of two runs

def compare_results(a, b, metric=None):
    """Compare results b against results a cell by cell: both accuracies and b - a with its 95% interval.

    The interval is Newcombe's for independent proportions. Runs with the same settings and seed
    share their trials, so the paired discordant counts (hits of only a, only b) are reported too."""
    for key in ('method', 'needle'):
        if a[key] != b[key]:
            raise ValueError(f"cannot compare results of {key} {a[key]!r} with {key} {b[key]!r}; run both with the "
                             f"same --{key}")
    metric = metric or a['primary_metric']
    b_cells = {(c['length'], c['depth']): c for c in b['cells']}
    rows = []
    for cell in a['cells']:
        other = b_cells.get((cell['length'], cell['depth']))
        if other is None or metric not in cell['metrics'] or metric not in other['metrics']:
            continue
        pa, pb = cell['metrics'][metric], other['metrics'][metric]
        low, high = newcombe_interval(pa['k'], pa['n'], pb['k'], pb['n'])
        row = {'length': cell['length'], 'depth': cell['depth'], 'a': pa, 'b': pb,
               'diff': pb['acc'] - pa['acc'], 'low': low, 'high': high}
        row.update(paired_counts(a, b, cell['length'], cell['depth'], metric))
        rows.append(row)
    if not rows:
        raise ValueError(f"the two results share no (length, depth) cell with metric {metric!r}; run both with "
                         f"the same --lengths, --depths and --method")
    return {'metric': metric, 'a': model_label(a), 'b': model_label(b), 'chance': a['chance'], 'rows': rows}


def paired_counts(a, b, length, depth, metric):
    """Return {'only_a', 'only_b'} hit counts when both runs hold the same trials of a cell, else {}."""
    def trials(results):
        return {(t['index'], t['target'], t['start_char']): t['hits'][metric] for t in results['trials']
                if t['length'] == length and t['depth'] == depth}
    ta, tb = trials(a), trials(b)
    if not ta or ta.keys() != tb.keys():
        return {}
    return {'only_a': sum(ta[k] and not tb[k] for k in ta), 'only_b': sum(tb[k] and not ta[k] for k in ta)}


def model_label(results):
    return results.get('model', {}).get('name') or 'model'


def format_comparison(comparison):
    lines = [f"{comparison['metric']}: a = {comparison['a']}, b = {comparison['b']}",
             f"{'length':>6} {'depth':>8} {'a':>22} {'b':>22} {'b - a':>24} {'n a/b':>9} {'only a/b':>9}"]
    for row in comparison['rows']:
        diff = f"{row['diff']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}]"
        counts = f"{row['a']['n']}/{row['b']['n']}"
        only = f"{row['only_a']}/{row['only_b']}" if 'only_a' in row else '-'
        lines.append(f"{row['length']:>6} {cell_label(row['depth']):>8} {format_proportion(row['a']):>22} "
                     f"{format_proportion(row['b']):>22} {diff:>24} {counts:>9} {only:>9}")
    lines.append("b - a: difference of accuracies with its 95% Newcombe (hybrid score) interval; only a/b: trials "
                 "that only a or only b got right, where both ran the same trials")
    return '\n'.join(lines)


# -----------------------------------------------------------------------------
# output files: results.json, heatmap.png, distance.png, compare.png

def write_atomic(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig, path):
    import io
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=120, bbox_inches='tight')
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt
    return plt


def save_results(results, out_dir):
    """Write results.json, heatmap.png and distance.png into out_dir; return their paths."""
    out_dir = Path(out_dir)
    paths = {'results': out_dir / 'results.json', 'heatmap': out_dir / 'heatmap.png',
             'distance': out_dir / 'distance.png'}
    write_atomic(paths['results'], json.dumps(results, indent=1).encode())
    save_figure(plot_heatmap(results), paths['heatmap'])
    save_figure(plot_distance(results), paths['distance'])
    return paths


def load_results(path):
    path = Path(path)
    if path.is_dir():
        path = path / 'results.json'
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}; pass a results.json written by nihs.py")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); pass a results.json written by nihs.py") from None
    if not isinstance(results, dict) or results.get('format') != RESULTS_FORMAT:
        raise ValueError(f"{path} is not a nihs.py results file (format {RESULTS_FORMAT!r} expected)")
    return results


def plotted_metrics(results):
    return [m for m in results['metrics'] if m.startswith('probe_')] if results['method'] == 'probe' \
        else [results['primary_metric']]


def plot_heatmap(results):
    """Context length x depth, coloured by accuracy; the control columns stand right of a gap."""
    plt = pyplot()
    lengths = sorted({c['length'] for c in results['cells']})
    columns = list(dict.fromkeys(c['depth'] for c in results['cells']))
    metrics = plotted_metrics(results)
    fig, axes = plt.subplots(1, len(metrics), figsize=((1.3 * len(columns) + 2.5) * len(metrics), 0.7 * len(lengths) + 2),
                             squeeze=False)
    cells = {(c['length'], c['depth']): c for c in results['cells']}
    for panel, (ax, metric) in enumerate(zip(axes[0], metrics)):
        grid_acc = np.full((len(lengths), len(columns)), np.nan)
        for r, length in enumerate(lengths):
            for col, depth in enumerate(columns):
                if (length, depth) in cells:
                    p = cells[length, depth]['metrics'][metric]
                    grid_acc[r, col] = p['acc']
                    ax.text(col, r, f"{p['acc']:.2f}\n[{p['low']:.2f},{p['high']:.2f}]", ha='center', va='center',
                            fontsize=7, color='white' if p['acc'] < 0.6 else 'black')
        image = ax.imshow(grid_acc, cmap='viridis', vmin=0, vmax=1, aspect='auto')
        ax.set_xticks(range(len(columns)), [cell_label(d) for d in columns])
        ax.set_yticks(range(len(lengths)), [str(x) for x in lengths])
        n_depths = sum(isinstance(d, int) for d in columns)
        ax.axvline(n_depths - 0.5, color='white', linewidth=3)
        ax.set_xlabel('needle depth (controls right)')
        if panel == 0:
            ax.set_ylabel('context length (tokens)')
        ax.set_title(f"{metric}, chance {results['chance']:.2f}", fontsize=9)
        fig.colorbar(image, ax=ax, label='accuracy')
    fig.suptitle(f"{model_label(results)}: {results['needle']} needles, n = {results['cells'][0]['n']} per cell",
                 fontsize=10, y=1.04)
    return fig


def plot_distance(results, bins=8):
    """Accuracy against needle-to-question distance (log-spaced bins, 95% Wilson bars)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    trials = [t for t in results['trials'] if 'distance' in t]
    if trials:
        distances = np.array([max(t['distance'], 1) for t in trials])  # 1, not 0, on a log axis
        edges = np.unique(np.geomspace(1, distances.max() + 1, bins + 1).round())
        which = np.clip(np.digitize(distances, edges) - 1, 0, len(edges) - 2)

        for metric in plotted_metrics(results):
            xs, ys, errors = [], [], [[], []]
            for b in range(len(edges) - 1):
                rows = [t for t, w in zip(trials, which) if w == b]
                if not rows:
                    continue
                p = proportion(sum(t['hits'][metric] for t in rows), len(rows))
                xs.append(float(np.mean([max(t['distance'], 1) for t in rows])))
                ys.append(p['acc'])
                errors[0].append(max(p['acc'] - p['low'], 0.0))  # rounding can put a bound a hair past acc
                errors[1].append(max(p['high'] - p['acc'], 0.0))
            ax.errorbar(xs, ys, yerr=errors, marker='o', capsize=3, label=metric)

    window = results.get('model', {}).get('config', {}).get('sliding_window')
    if window:
        ax.axvline(window, color='gray', linestyle=':', label=f"sliding window ({window})")
    ax.axhline(results['chance'], color='red', linestyle='--', label='chance')

    ax.set_xscale('log')
    ax.set_ylim(0, 1.02)
    ax.set_xlabel('tokens between needle and question')
    ax.set_ylabel('accuracy')
    ax.set_title(f"{model_label(results)}: {results['needle']} needles", fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_comparison(comparison):
    """Both models' accuracies per cell (Wilson bars), and b - a with its Newcombe interval."""
    plt = pyplot()
    rows = comparison['rows']
    x = np.arange(len(rows))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.6 * len(rows) + 2), 6), sharex=True)
    for offset, side in ((-0.2, 'a'), (0.2, 'b')):
        acc = np.array([r[side]['acc'] for r in rows])
        errors = np.clip([acc - [r[side]['low'] for r in rows], [r[side]['high'] for r in rows] - acc], 0, None)
        top.bar(x + offset, acc, width=0.4, yerr=errors, capsize=2, label=f"{side}: {comparison[side]}")
    top.axhline(comparison['chance'], color='red', linestyle='--', linewidth=1, label='chance')
    top.set_ylabel(comparison['metric'])
    top.set_ylim(0, 1.05)
    top.legend(fontsize=8)
    diff = np.array([r['diff'] for r in rows])
    bottom.errorbar(x, diff, yerr=np.clip([diff - [r['low'] for r in rows], [r['high'] for r in rows] - diff], 0, None),
                    fmt='o', capsize=3)
    bottom.axhline(0, color='gray', linewidth=1)
    bottom.set_ylabel('b - a')
    bottom.set_xticks(x, [f"{r['length']}\n{cell_label(r['depth'])}" for r in rows], fontsize=7)
    bottom.set_xlabel('context length / needle depth')
    return fig


# -----------------------------------------------------------------------------
# models, checkpoints and haystack documents

def load_checkpoint(path):
    """Load the newest readable checkpoint under `path`; return (Gemma in fp32, checkpoint dict + 'path')."""
    model, checkpoint = model_py.load_checkpoint(path)
    file = Path(path) if Path(path).is_file() else model_py.checkpoint_path(path, checkpoint['iter'])
    return model, {**checkpoint, 'path': str(file)}


def load_model(settings):
    """Load the model named by the settings; return (model, identity dict, training settings or {})."""
    torch_dtype = DTYPES.get(settings['dtype'])
    if torch_dtype is None:
        raise ValueError(f"unknown dtype {settings['dtype']!r}; use --dtype=float32 or --dtype=bfloat16")
    check_dtype(torch_dtype)  # names the reason float16 is refused
    device = torch.device(pick_device(settings['device']))
    if settings['ckpt']:
        model, checkpoint = load_checkpoint(settings['ckpt'])
        train_config = checkpoint.get('config') or {}
        identity = {'name': f"{Path(checkpoint['path']).parent.name}/{Path(checkpoint['path']).name}",
                    'checkpoint': checkpoint['path'], 'iter': checkpoint.get('iter'),
                    'training': {k: train_config.get(k) for k in ('init_from', 'dataset', 'memory_loss',
                                                                  'memory_weight', 'memory_layer', 'memory_offset')
                                 if k in train_config}}
    else:
        model, train_config = Gemma.from_pretrained(settings['init_from']), {}
        identity = {'name': Path(str(settings['init_from'])).name, 'source': str(settings['init_from'])}
    model = model.to(device=device, dtype=torch_dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    identity.update({'num_params': model.num_params(), 'dtype': str(torch_dtype).removeprefix('torch.'),
                     'device': str(device), 'config': model.config.to_dict()})
    return model, identity, train_config


def tokenizer_source(settings, train_config):
    """Return the tokenizer source: the setting, else the checkpoint's training tokenizer, else init_from."""
    if settings['tokenizer']:
        return settings['tokenizer']
    if settings['ckpt']:
        for key in ('tokenizer', 'init_from'):
            if train_config.get(key) not in (None, '', 'scratch', 'resume'):
                return train_config[key]
        return GGUF_ALIAS
    return settings['init_from']


def load_documents(dataset_name, split_name, tokenizer_name, train_config=None):
    """Return the haystack Documents of a split, prepared (and cached) by data.py.

    The data settings of a checkpoint's training run are reused so that its held-out split is the
    one read here."""
    import inspect
    import data
    train_config = train_config or {}
    if train_config.get('dataset') == dataset_name and split_name == 'train':
        raise ValueError(f"split 'train' of {dataset_name} is the checkpoint's training text; use --split=test")
    same_source = train_config.get('dataset', dataset_name) == dataset_name
    keys = [k for k in inspect.signature(data.prepare).parameters if k not in ('dataset', 'tokenizer', 'verbose')]
    overrides = {k: train_config[k] for k in keys if same_source and train_config.get(k) not in (None, '')}
    folder = data.prepare(dataset=dataset_name, tokenizer=tokenizer_name, verbose=False, **overrides)
    records = folder.records(split_name)
    if not records:
        raise ValueError(f"split {split_name!r} of {dataset_name} has no documents; pick another --split")
    return [Document(r['title'], folder.text(split_name, i), r['length']) for i, r in enumerate(records)]


def load_tokenizer(source):
    import data
    return data.Tokenizer.from_source(source)


# -----------------------------------------------------------------------------
# checks of settings: each failure is one line naming the value and the fix

def check_settings(s):
    if s['needle'] not in NEEDLE_KINDS:
        raise ValueError(f"unknown needle kind {s['needle']!r}; use --needle=uuid or --needle=city")
    if s['method'] not in METHODS:
        raise ValueError(f"unknown method {s['method']!r}; use --method=mc or --method=probe")
    if not isinstance(s['n'], int) or s['n'] < 1:
        raise ValueError(f"n must be an integer >= 1, got {s['n']!r}; pass e.g. --n=50")
    if not s['lengths'] or any(not isinstance(x, int) or x < 1 for x in s['lengths']):
        raise ValueError(f"lengths must be positive integers, got {s['lengths']!r}; pass e.g. --lengths=256,512")
    if any(not isinstance(d, int) or not 0 <= d <= 100 for d in s['depths']):  # [] runs the controls alone
        raise ValueError(f"depths must be integer percents in 0..100, got {s['depths']!r}; pass e.g. --depths=0,50,100")
    for key in ('lengths', 'depths'):
        if len(set(s[key])) != len(s[key]):
            raise ValueError(f"{key} {s[key]!r} repeats a value; list each once")
    if not isinstance(s['prefix_tokens'], int) or s['prefix_tokens'] < 1:
        raise ValueError(f"prefix_tokens must be an integer >= 1, got {s['prefix_tokens']!r}")
    if s['method'] == 'probe':
        limit = len(CITIES) if s['needle'] == 'city' else 10_000
        if not isinstance(s['probe_classes'], int) or not CHOICES <= s['probe_classes'] <= limit:
            raise ValueError(f"probe_classes must be an integer in {CHOICES}..{limit} for {s['needle']} needles, "
                             f"got {s['probe_classes']!r}")
        if not s['layers'] or any(not isinstance(x, int) for x in s['layers']):
            raise ValueError(f"layers must be a list of hidden-state indices, got {s['layers']!r}; pass e.g. --layers=6,12")
        if not isinstance(s['probe_train_n'], int) or s['probe_train_n'] < 0:
            raise ValueError(f"probe_train_n must be an integer >= 0 (0 = n), got {s['probe_train_n']!r}")


def check_model_fits(model, tokenizer, s):
    limit = model.config.max_position_embeddings
    too_long = [x for x in s['lengths'] if x > limit]
    if too_long:
        raise ValueError(f"length {too_long[0]} exceeds the model's limit max_position_embeddings={limit}; "
                         f"use --lengths up to {limit}")
    vocab = getattr(tokenizer, 'vocab_size', 0)
    if vocab > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {vocab} ids but the model only {model.config.vocab_size}; pass the "
                         f"model's own tokenizer with --tokenizer")
    if s['method'] == 'probe':
        model.check_hidden_layers(s['layers'])  # raises ValueError naming the valid range


def probe_train_count(s):
    return s['probe_train_n'] or s['n']


def check_probe_labels(s):
    """Fail before any trial runs when the probe's training trials would name fewer than two values."""
    values = probe_values(s['needle'], s['probe_classes'], s['seed'])
    n_train = probe_train_count(s)
    labels = {draw_needles(s['needle'], content_rng(s['seed'], 'probe-train', length, i), values)[0].value
              for length in s['lengths'] for i in range(n_train)}
    if len(labels) < 2:
        raise ValueError(f"the probe's {n_train} training trials per length all have the same target value, so "
                         f"there is nothing to classify; raise --probe_train_n (now {s['probe_train_n']}) or --n")


def check_grid_fits(tokenizer, docs, s):
    """Fail before any trial runs when a length cannot hold the needles or cannot be cut from the documents.

    The probe cuts each haystack from one half of a document, so its documents must be twice as long."""
    region = (0.0, 0.5) if s['method'] == 'probe' else (0.0, 1.0)
    where = f"{s['dataset']}/{s['split']}" + (' (half of each document, as the probe uses)' if region[1] < 1 else '')
    for length in s['lengths']:
        check_haystack_room(docs, length, region, f"{where} for length {length}")
        make_trial(tokenizer, docs, s['needle'], length, 'adjacent', 0, s['seed'], region=region)  # too short?
    if s['method'] == 'probe':
        check_probe_labels(s)


def join_compare_args(argv):
    """Accept `--compare a.json b.json` (two plain arguments) as well as `--compare=a.json,b.json`."""
    if '--compare' in argv:
        i = argv.index('--compare')
        items = argv[i + 1:i + 3]
        if len(items) != 2 or any(x.startswith('-') for x in items):
            raise ValueError("--compare needs two results (results.json files or model sources): "
                             "--compare a.json b.json")
        return argv[:i] + [f"--compare={items[0]},{items[1]}"] + argv[i + 3:]
    return argv


def default_out_dir(settings, identity):
    if settings['out']:
        return Path(settings['out'])
    if settings['ckpt']:
        return Path(identity['checkpoint']).parent / 'nihs'
    return Path('out') / 'nihs' / re.sub(r'[^A-Za-z0-9_.-]+', '-', identity['name'])


# -----------------------------------------------------------------------------
# the script: one model's grid, or the comparison of two

def evaluate(settings):
    """Load a model and its haystacks, run the grid, write and print the results; return them."""
    settings = resolve_settings(settings)
    with exit_on_error(ValueError, FileNotFoundError, RuntimeError):  # bad input: one line, exit status 2
        model, identity, train_config = load_model(settings)
        source = tokenizer_source(settings, train_config)
        tok = load_tokenizer(source)
        check_model_fits(model, tok, settings)
        docs = load_documents(settings['dataset'], settings['split'], source, train_config)
        check_grid_fits(tok, docs, settings)
        out_dir = default_out_dir(settings, identity)
    why = 'as requested' if settings['dtype'] != 'float32' else 'the default: exact log-probabilities'
    print(f"model {identity['name']}: {identity['num_params']:,} parameters, {identity['dtype']} ({why}) "
          f"on {identity['device']}")
    print(f"haystacks: {len(docs)} documents of {settings['dataset']}/{settings['split']}, tokenizer {source}")
    results = run_nihs(model, tok, settings, docs, identity=identity)
    paths = save_results(results, out_dir)
    print(format_table(results))
    print("seconds per trial: " + ', '.join(f"{length} tokens {seconds:.2f}" for length, seconds in
                                              results['seconds_per_trial_by_length'].items()))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


def compare_runs(settings):
    """Compare two results (evaluating model sources first) and write compare.json and compare.png."""
    settings = resolve_settings(settings)
    out_dir = Path(settings['out'] or Path('out') / 'nihs' / 'compare')
    runs = []
    for side, item in zip('ab', settings['compare']):
        path = Path(str(item))
        has_checkpoints = path.is_dir() and any(path.glob('ckpt_*.pt'))
        run_out = str(out_dir / side) if settings['out'] else ''  # '' = the model's default folder
        if path.suffix == '.json' or (path.is_dir() and (path / 'results.json').is_file() and not has_checkpoints):
            with exit_on_error(ValueError, FileNotFoundError):
                runs.append(load_results(path))
        elif path.suffix == '.pt' or has_checkpoints:
            runs.append(evaluate({**settings, 'ckpt': str(path), 'out': run_out}))
        else:  # a weights source: hub id, HF folder, .gguf file or the GGUF alias
            runs.append(evaluate({**settings, 'ckpt': '', 'init_from': str(item), 'out': run_out}))
    with exit_on_error(ValueError):
        comparison = compare_results(*runs)
    write_atomic(out_dir / 'compare.json', json.dumps(comparison, indent=1).encode())
    save_figure(plot_comparison(comparison), out_dir / 'compare.png')
    print(format_comparison(comparison))
    print(f"wrote {out_dir / 'compare.json'}, {out_dir / 'compare.png'}")
    return comparison


if __name__ == '__main__':
    with exit_on_error(ValueError, FileNotFoundError):
        config = configure(globals(), join_compare_args(sys.argv[1:]))
        config = {**config, 'ckpt': config['ckpt'] or '', 'out': config['out'] or ''}  # --no_ckpt gives None
        check_settings(config)
        if config['compare'] and len(config['compare']) != 2:
            raise ValueError(f"compare needs exactly two results, got {config['compare']!r}; "
                             f"pass --compare a.json b.json")
    if config['compare']:
        compare_runs(config)
    else:
        evaluate(config)
