"""downstream.py: GemmaLM against lm-eval's own HFLM on transformers' Gemma 3, on local ARC and HellaSwag files."""

import json
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from transformers import AutoTokenizer

from downstream import GemmaLM, run_tasks, task_manager_for
from model import Gemma
from test_perplexity import tiny_model, transformers_copy

ROOT = Path(__file__).resolve().parent.parent
TASKS = ['arc_challenge_local', 'hellaswag_local']

# Made-up questions in the schema of allenai/ai2_arc (ARC-Challenge): labels A-D, or 1-3 on some rows.
ARC_ROWS = [
    ("Which form of energy does a solar panel change into electricity?",
     ["heat from the ground", "light from the Sun", "sound from the wind", "chemical energy in batteries"], "B"),
    ("A student drops a ball and a feather inside a tube with all the air removed. What will the student observe?",
     ["The ball lands first.", "The feather lands first.", "Both land at the same time.", "Neither object falls."], "C"),
    ("Which tool is best for measuring the volume of a liquid?",
     ["a graduated cylinder", "a thermometer", "a balance"], "1"),
    ("Which property of a mineral is tested by scratching it with a steel nail?",
     ["color", "hardness", "luster", "mass"], "B"),
    ("What gas do plants mainly take in from the air to make their food?",
     ["oxygen", "nitrogen", "carbon dioxide", "water vapor"], "C"),
    ("Why does the Moon seem to change shape during a month?",
     ["Earth's shadow covers different parts of it.", "Different amounts of its lit half face Earth.",
      "Clouds hide parts of it.", "The Moon grows and shrinks."], "B"),
]

# Made-up rows in the schema of Rowan/hellaswag; the WikiHow-style rows carry the [header]/[title]/[step]
# markers that lm-eval's preprocessing removes.
HELLASWAG_ROWS = [
    ("Making coffee", "A man pours water into the top of a coffee machine.", "he",
     ["places a paper filter in the basket and scoops ground coffee into it.", "jumps into a swimming pool with his shoes on.",
      "paints the coffee machine a bright shade of red.", "reads the newspaper upside down while singing loudly."], 0),
    ("Home and Garden", "[header] How to water a houseplant [title] Check the soil first.", "[step] Push your finger",
     ["through the window so the plant can see outside.", "into the soil up to the first knuckle to feel whether it is dry.",
      "into the freezer to chill it before watering.", "onto the television remote to change the channel."], 1),
    ("Playing guitar", "A boy sits on a stool holding an acoustic guitar.", "he",
     ["swallows the guitar strings one at a time.", "throws the guitar onto the roof of the house.",
      "strums the strings while pressing chords with his left hand.", "plants the guitar in a flower pot and waters it."], 2),
    ("Brushing teeth", "A girl squeezes toothpaste onto a toothbrush at the sink.", "she",
     ["puts the toothbrush in the oven to warm it.", "brushes the dog's fur with it.",
      "throws the toothpaste out of the window.", "brushes her teeth in small circles and then rinses her mouth."], 3),
    ("Shoveling snow", "A person in a thick coat stands in a driveway covered with snow.", "the person",
     ["lies down and falls asleep in the snow.", "lifts the shovel and pushes snow to the side of the driveway.",
      "paints the snow green with a brush.", "mails the snow to a friend in another city."], 1),
    ("Personal Care and Style", "[header] How to tie a tie [title] Drape the tie around your neck.",
     "[step] Let the wide end hang",
     ["about a foot lower than the narrow end on your right side.", "from the ceiling fan while it spins quickly.",
      "inside the refrigerator overnight.", "in the garden so the birds can use it."], 0),
]


def write_local_tasks(folder):
    """Write the rows as JSONL and task YAMLs that include lm-eval's own arc_challenge / hellaswag configs.

    The YAMLs override only where the data comes from, so prompts, choices and metrics are lm-eval's.
    """
    folder = Path(folder)
    lm_eval_tasks = Path(lm_eval.__file__).parent / 'tasks'
    with open(folder / 'arc.jsonl', 'w') as f:
        for i, (question, texts, answer) in enumerate(ARC_ROWS):
            labels = ['1', '2', '3', '4', '5'] if answer.isdigit() else ['A', 'B', 'C', 'D', 'E']
            row = {'id': f'Local_{i}', 'question': question,
                   'choices': {'text': texts, 'label': labels[:len(texts)]}, 'answerKey': answer}
            f.write(json.dumps(row) + '\n')
    with open(folder / 'hellaswag.jsonl', 'w') as f:
        for i, (activity, ctx_a, ctx_b, endings, label) in enumerate(HELLASWAG_ROWS):
            row = {'ind': i, 'activity_label': activity, 'ctx_a': ctx_a, 'ctx_b': ctx_b, 'ctx': f'{ctx_a} {ctx_b}',
                   'endings': endings, 'source_id': f'local~{i}', 'split': 'val', 'split_type': 'indomain',
                   'label': str(label)}  # the hub dataset stores the label as a string
            f.write(json.dumps(row) + '\n')
    (folder / 'arc_challenge_local.yaml').write_text(
        f"include: {lm_eval_tasks / 'arc' / 'arc_challenge.yaml'}\n"
        f"task: arc_challenge_local\n"
        f"dataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'arc.jsonl'}\n"
        f"training_split: null\nvalidation_split: null\ntest_split: test\n")
    (folder / 'hellaswag_local.yaml').write_text(
        f"include: {lm_eval_tasks / 'hellaswag' / 'hellaswag.yaml'}\n"
        f"task: hellaswag_local\n"
        f"dataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {folder / 'hellaswag.jsonl'}\n"
        f"training_split: null\n")
    return folder


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
    return write_local_tasks(tmp_path_factory.mktemp('tasks'))


@pytest.fixture(scope='module')
def tokenizer():
    from data import Tokenizer
    return Tokenizer.from_source('gemma3-270m-gguf')


@pytest.fixture(scope='module')
def hf_tokenizer(gguf_path):
    """transformers' own tokenizer read from the GGUF file, independent of our SentencePiece rebuild."""
    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope='module')
def real_hflm(real_model, hf_tokenizer):
    """lm-eval's HFLM over transformers' Gemma 3 holding the real 270M's weights."""
    from lm_eval.models.huggingface import HFLM
    return HFLM(pretrained=transformers_copy(real_model), tokenizer=hf_tokenizer, batch_size=8)

# -----------------------------------------------------------------------------
# the real 270M


def test_real_270m_equals_hflm(real_model, tokenizer, real_hflm, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    # the first 4 rows of each task: a numeric-label ARC question and WikiHow-style HellaSwag rows among them
    lm = GemmaLM(real_model, tokenizer, batch_size=8)
    ours = run_tasks(lm, TASKS, limit=4, task_dir=str(task_dir), log_samples=True)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    reference = simple_evaluate(model=real_hflm, tasks=TASKS, task_manager=manager, num_fewshot=0, limit=4,
                                log_samples=True)
    for name in TASKS:
        expected = reference['results'][name]
        entry = ours['tasks'][name]
        assert entry['samples'] == 4
        assert entry['version'] == reference['versions'][name] == 1.0
        for metric in ('acc', 'acc_norm'):
            assert entry[metric] == expected[f'{metric},none'], (name, metric)
            assert entry[f'{metric}_stderr'] == pytest.approx(expected[f'{metric}_stderr,none'], abs=1e-12)
        for mine, theirs in zip(ours['raw']['samples'][name], reference['samples'][name], strict=True):
            assert mine['doc_id'] == theirs['doc_id']
            for (m_args, t_args) in zip(mine['arguments'], theirs['arguments'], strict=True):
                assert m_args == t_args  # the same context and continuation strings
                context, continuation = m_args
                assert lm._encode_pair(context, continuation) == real_hflm._encode_pair(context, continuation)
            for (m_resp,), (t_resp,) in zip(mine['resps'], theirs['resps'], strict=True):
                assert m_resp[0] == pytest.approx(t_resp[0], rel=1e-4, abs=1e-4)  # summed log-probability
                assert m_resp[1] == t_resp[1]  # is greedy


def test_real_270m_generation_equals_hflm(real_model, tokenizer, real_hflm):
    requests = [Instance('generate_until', {}, (context, {'until': until, 'max_gen_toks': 12, 'do_sample': False}), 0)
                for context, until in (("Question: What is the capital of France?\nAnswer:", ['\n']),
                                       ("The three primary colors are", ['.', '\n']))]
    ours = GemmaLM(real_model, tokenizer).generate_until(requests, disable_tqdm=True)
    theirs = [real_hflm.generate_until([r], disable_tqdm=True)[0] for r in requests]  # one at a time: no padding
    assert ours == theirs
    assert all(text.strip() for text in ours)  # real words came out, not an empty string

# -----------------------------------------------------------------------------
# a tiny model


def test_rolling_loglikelihood_uses_bos_led_windows(tokenizer):
    model = tiny_model()
    ref = transformers_copy(model)
    text = "Some words to score, long enough to need several windows of eight tokens each, and then a few more."
    lm = GemmaLM(model, tokenizer, max_length=8)
    (ours,) = lm.loglikelihood_rolling([Instance('loglikelihood_rolling', {}, (text,), 0)], disable_tqdm=True)
    ids = tokenizer.encode(text)
    assert len(ids) > 16
    assert len(ids) % 8  # the last window is partial, so it is moved back
    expected = 0.0
    with torch.no_grad():
        # Window k is BOS + 7 tokens and scores tokens [8k, 8k + 8). The last window ends at the
        # text's end, so it also has earlier tokens as context.
        for end in list(range(8, len(ids), 8)) + [len(ids)]:
            start, first = end - 8, (end - 1) // 8 * 8
            logp = torch.log_softmax(ref(torch.tensor([[2] + ids[start:end - 1]])).logits[0].double(), -1)
            expected += sum(logp[j - start, ids[j]].item() for j in range(first, end))
    assert ours == pytest.approx(expected, rel=1e-5)


def test_long_context_truncated_from_left(tokenizer):
    """As HFLM: a context longer than max_length keeps its last tokens; scores equal a direct forward."""
    model = tiny_model()
    ref = transformers_copy(model)
    lm = GemmaLM(model, tokenizer, max_length=12)
    context, continuation = list(range(1000, 1030)), [7, 8, 9]
    ((logprob, greedy),) = lm._loglikelihood_tokens([(('', ''), context, continuation)], disable_tqdm=True)
    inputs = (context + continuation)[-13:][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([inputs])).logits[0].float(), -1)[-3:]
    assert logprob == pytest.approx(logp[torch.arange(3), torch.tensor(continuation)].sum().item(), rel=1e-5)
    assert greedy == bool((logp.argmax(-1) == torch.tensor(continuation)).all())


def test_choices_batched_equal_one_at_a_time(tokenizer):
    model = tiny_model()
    requests = [(('', ''), [2, 50, 60, 70], cont) for cont in ([5], [6, 7, 8], [9, 10], [11, 12, 13, 14, 15])]
    requests.append((('', ''), [2, 80], [5, 6]))  # another context in the same call
    together = GemmaLM(model, tokenizer, batch_size=16)._loglikelihood_tokens(requests, disable_tqdm=True)
    alone = [GemmaLM(model, tokenizer, batch_size=1)._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in requests]
    for (a, a_greedy), (b, b_greedy) in zip(together, alone):
        assert a == pytest.approx(b, rel=1e-5)
        assert a_greedy == b_greedy


def test_sampling_request_rejected(tokenizer):
    lm = GemmaLM(tiny_model(), tokenizer)
    request = Instance('generate_until', {}, ('Hello', {'until': ['\n'], 'do_sample': True, 'temperature': 0.7}), 0)
    with pytest.raises(ValueError, match='greedily only'):
        lm.generate_until([request], disable_tqdm=True)


def test_unknown_task_suggests_name(task_dir):
    with pytest.raises(ValueError, match=r"unknown lm-eval task 'arc_chalenge'; did you mean arc_challenge"):
        task_manager_for(['arc_chalenge'], str(task_dir))

# -----------------------------------------------------------------------------
# the command line


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny model saved by transformers, with the real tokenizer.model beside it."""
    folder = tmp_path_factory.mktemp('tiny')
    transformers_copy(tiny_model()).save_pretrained(folder)
    (folder / 'tokenizer.model').write_bytes(tokenizer.model_bytes)
    return folder


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / 'downstream.py'), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_cli_local_tasks_write_json(tmp_path, tiny_dir, task_dir, tokenizer):
    out = tmp_path / 'result.json'
    result = run_cli(f'--init_from={tiny_dir}', f'--task_dir={task_dir}', '--tasks=arc_challenge_local,hellaswag_local',
                     '--limit=4', f'--out_json={out}')
    assert result.returncode == 0, result.stderr
    assert 'acc_norm' in result.stdout
    assert 'arc_challenge_local' in result.stdout
    report = json.loads(out.read_text())
    assert report['lm_eval_version'] == lm_eval.__version__
    expected = run_tasks(GemmaLM(Gemma.from_pretrained(tiny_dir), tokenizer), TASKS, limit=4, task_dir=str(task_dir))
    for name in TASKS:
        entry = report['tasks'][name]
        assert entry['samples'] == 4
        assert entry['version'] == 1.0
        for metric in ('acc', 'acc_norm'):
            assert entry[metric] == expected['tasks'][name][metric]
            assert 0 <= entry[metric] <= 1
            assert entry[f'{metric}_stderr'] >= 0


def test_cli_hub_task_offline_names_fix(tiny_dir):
    result = run_cli(f'--init_from={tiny_dir}', '--tasks=arc_challenge', '--limit=2')
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(error) == 1
    assert 'Hugging Face hub' in error[0]
    assert '--task_dir' in error[0]
