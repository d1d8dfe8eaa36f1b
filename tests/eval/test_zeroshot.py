"""Zero-shot scoring: log-likelihoods against hand-computed values from rigged models, acc / acc_norm,
batching, the task loaders on the real data files, the CLI on a tiny data directory, the lm-eval adapter."""

import json
import math

import pytest
import torch

from atomq.cli import main
from atomq.data import default_data_dir
from atomq.eval.tasks import TASKS, Example, load_examples
from atomq.eval.zeroshot import accuracy, encode_pair, evaluate_tasks, loglikelihoods, score_examples


class Bigram(torch.nn.Module):
    """Predicts token (t + 1) % V after token t with probability p, every other token with (1 - p) / (V - 1).
    Records the input shapes it saw."""

    def __init__(self, vocab=8, p=0.9):
        super().__init__()
        self.vocab, self.p, self.shapes = vocab, p, []
        table = torch.full((vocab, vocab), (1 - p) / (vocab - 1))
        table[torch.arange(vocab), (torch.arange(vocab) + 1) % vocab] = p
        self.table = table.log()  # [V, V]: row = current token, column = next token

    def forward(self, ids):
        self.shapes.append(tuple(ids.shape))
        return self.table[ids]  # [B, T, V]


class Unigram(torch.nn.Module):
    """The same next-token distribution at every position: softmax(bias)."""

    def __init__(self, bias):
        super().__init__()
        self.bias = bias

    def forward(self, ids):
        return self.bias.expand(*ids.shape, -1)


def test_loglikelihood_equals_hand_computed_values():
    model = Bigram(vocab=8, p=0.9)
    hit, miss = math.log(0.9), math.log(0.1 / 7)
    requests = [([0, 1, 2], [3, 4]), ([0, 1, 2], [3, 5]), ([6], [7, 0, 1]), ([5, 5], [2])]
    out = loglikelihoods(model, requests, batch_size=3, progress=False)
    expected = [(2 * hit, True), (hit + miss, False), (3 * hit, True), (miss, False)]
    for (ll, greedy), (ll_ref, greedy_ref) in zip(out, expected):
        assert ll == pytest.approx(ll_ref, abs=1e-5) and greedy == greedy_ref
    assert sorted(model.shapes) == [(1, 2), (3, 4)]  # longest first, right-padded to the longest input


def test_long_context_is_cut_from_the_left():
    model = Bigram(vocab=8, p=0.9)
    (ll, greedy), = loglikelihoods(model, [([0, 1, 2, 3, 4, 5], [6, 7])], max_length=4, progress=False)
    assert model.shapes == [(1, 4)]  # input = tokens 3..6; 6 and 7 are predicted from 5 and 6
    assert ll == pytest.approx(2 * math.log(0.9), abs=1e-5) and greedy
    with pytest.raises(ValueError, match="does not fit"):
        loglikelihoods(model, [([0], [1, 2, 3, 4, 5])], max_length=4, progress=False)


def test_acc_and_acc_norm_against_hand_computed():
    ex = lambda choices, gold: Example(("q",) * len(choices), tuple(" " + c for c in choices), choices, gold)
    examples = [
        ex(("ab", "abcdef"), 1),  # ll -2, -3: acc picks 0; per character -1, -0.5: acc_norm picks 1
        ex(("a", "b", "c"), 2),  # ll -1, -2, -0.5: both pick 2
        ex(("xx", "yyyy"), 0),  # ll -4, -6: acc picks 0; per character -2, -1.5: acc_norm picks 1
        ex(("p", "q"), 0),  # a tie: the first maximum wins, as numpy's argmax
    ]
    lls = [[-2.0, -3.0], [-1.0, -2.0, -0.5], [-4.0, -6.0], [-1.0, -1.0]]
    assert accuracy(examples, lls) == (3 / 4, 3 / 4)
    assert accuracy(examples[:1], lls[:1]) == (0.0, 1.0)


def test_rigged_model_picks_the_answer_it_prefers(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    fox = tok.encode(" fox", add_special_tokens=False)
    bias = torch.zeros(len(tok))
    bias[fox] = 6.0  # every position strongly prefers the tokens of " fox"
    logp = torch.log_softmax(bias, -1)
    examples = [Example(("Question: which animal?\nAnswer:",) * 2, (" fox", " river"), ("fox", "river"), 0),
                Example(("the lazy dog and the",) * 2, (" river", " fox"), ("river", "fox"), 1)]
    lls = score_examples(Unigram(bias), tok, examples, batch_size=4, progress=False)
    river = tok.encode(" river", add_special_tokens=False)
    assert lls[0] == pytest.approx([logp[fox].sum().item(), logp[river].sum().item()], abs=1e-5)
    assert lls[1] == pytest.approx(lls[0][::-1], abs=1e-5)
    assert accuracy(examples, lls) == (1.0, 1.0)


def test_encode_pair_splits_the_whole_encoding(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ctx, cont = encode_pair(tok, "the quick brown", " fox jumps")
    assert ctx + cont == tok.encode("the quick brown fox jumps") and ctx == tok.encode("the quick brown")
    # a trailing space of the context moves to the continuation, so " fox" stays one word
    assert encode_pair(tok, "the quick brown ", "fox jumps") == (ctx, cont)
    assert encode_pair(tok, "", "fox")[0] == [tok.bos_token_id]


@pytest.mark.parametrize("kv_bits", ["none", 4])
def test_batched_scores_equal_unbatched_on_a_real_model(tiny_model, kv_bits):
    from atomq.model.loader import load_model

    lm = load_model(str(tiny_model("llama")), torch.float32, kv_bits=kv_bits)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(0, 320, (n,), generator=g).tolist()
    requests = [(ids(n_ctx), ids(n_cont)) for n_ctx, n_cont in [(1, 1), (7, 3), (20, 5), (3, 1), (12, 2)]]
    one = loglikelihoods(lm.model, requests, batch_size=1, progress=False)
    for bs in (2, 5):
        many = loglikelihoods(lm.model, requests, batch_size=bs, progress=False)
        assert [m.logprob for m in many] == pytest.approx([o.logprob for o in one], abs=1e-4)
    ctx, cont = requests[2]  # the oracle: one unpadded forward over the whole sequence
    logp = torch.log_softmax(lm.model(torch.tensor([ctx + cont]))[0].float(), -1)  # [T, V]
    ref = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    assert one[2].logprob == pytest.approx(ref, abs=1e-4)


# the real data files: counts from each dataset's NOTES.md
ROWS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "hellaswag": 10042, "winogrande": 1267}
N_CHOICES = {"piqa": {2}, "arc_easy": {3, 4, 5}, "arc_challenge": {3, 4, 5}, "boolq": {2}, "hellaswag": {4},
             "winogrande": {2}}


def _data_dir():
    try:
        return default_data_dir()
    except FileNotFoundError:
        pytest.skip("the offline data directory (shared/data or $ATOMQ_DATA_DIR) is absent")


@pytest.mark.parametrize("task", list(TASKS))
def test_task_loader_on_the_real_files(task):
    data = _data_dir()
    examples = load_examples(task, data)
    assert len(examples) == ROWS[task]
    for ex in examples:
        assert len(ex.choices) in N_CHOICES[task] and 0 <= ex.gold < len(ex.choices)
        assert all(c.startswith(" ") and len(c) > 1 for c in ex.continuations)
    first = examples[0]
    if task in ("piqa", "arc_easy", "arc_challenge"):
        assert first.contexts[0].startswith("Question: ") and first.contexts[0].endswith("\nAnswer:")
        assert first.continuations == tuple(" " + c for c in first.choices)
    if task == "boolq":
        assert first.contexts[0].endswith("?\nAnswer:") and first.continuations == (" no", " yes")
        assert sum(ex.gold for ex in examples) == 2033  # "true" labels, per the NOTES
    if task == "winogrande":  # the gold of the partial form agrees with the official 1/2 labels
        labels = (data / "winogrande" / "dev-labels.lst").read_text().split()
        assert [ex.gold + 1 for ex in examples] == [int(x) for x in labels]
        assert first.contexts[0] != first.contexts[1] and first.continuations[0] == first.continuations[1]
    assert len(load_examples(task, data, limit=3)) == 3


def test_arc_numeric_answer_keys_map_to_the_right_choice():
    data = _data_dir()
    rows = [json.loads(line) for line in (data / "arc" / "ARC-Easy-Test.jsonl").read_text().splitlines()]
    i = next(i for i, r in enumerate(rows) if r["answerKey"].isdigit())
    ex = load_examples("arc_easy", data, limit=i + 1)[i]
    assert ex.choices[ex.gold] == next(c["text"] for c in rows[i]["question"]["choices"]
                                       if c["label"] == rows[i]["answerKey"])


@pytest.fixture
def small_data_dir(tmp_path):
    """PIQA and BoolQ files in the real formats, three rows each."""
    (tmp_path / "piqa").mkdir()
    piqa = [{"goal": "open a jar", "sol1": "twist the lid ", "sol2": "eat the lid"}] * 3
    (tmp_path / "piqa" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in piqa))
    (tmp_path / "piqa" / "valid-labels.lst").write_text("0\n1\n0\n")
    (tmp_path / "boolq").mkdir()
    boolq = [{"question": "is the fox quick", "passage": "Fox -- the quick brown fox.", "idx": i, "label": lab}
             for i, lab in enumerate(["true", "false", "true"])]
    (tmp_path / "boolq" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in boolq))
    return tmp_path


def test_identical_questions_get_identical_scores(tiny_model, small_data_dir):
    from atomq.model.loader import load_model

    lm = load_model(str(tiny_model("llama")), torch.float32)
    res = {r.task: r for r in evaluate_tasks(lm.model, lm.tokenizer, ["piqa", "boolq"], small_data_dir,
                                             batch_size=4, progress=False)}
    # the three PIQA rows are one question with golds 0, 1, 0: the model is right on 2/3 or on 1/3
    assert res["piqa"].acc in (1 / 3, 2 / 3) and res["piqa"].acc_norm in (1 / 3, 2 / 3)
    assert res["boolq"].acc in (1 / 3, 2 / 3) and res["boolq"].n == 3


def test_cli_zeroshot_prints_a_table_and_writes_json(tiny_model, small_data_dir, tmp_path, capsys):
    out = tmp_path / "zs.jsonl"
    assert main(["eval", "zeroshot", "--model", str(tiny_model("llama")), "--tasks", "piqa,boolq", "--limit", "2",
                 "--data-dir", str(small_data_dir), "--dtype", "float32", "--batch-size", "3",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| piqa | acc_norm |" in printed and "| boolq | acc |" in printed and "| average |" in printed
    row = json.loads(out.read_text())
    assert row["tasks"]["piqa"]["n"] == 2 and row["tasks"]["boolq"]["metric"] == "acc"
    assert row["average"] == pytest.approx((row["tasks"]["piqa"]["acc_norm"] + row["tasks"]["boolq"]["acc"]) / 2)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "piqa,mmlu"], "unknown zero-shot task 'mmlu'"),
    (["--tasks", "piqa", "--limit", "0"], "--limit must be >= 1"),
    (["--tasks", "piqa", "--batch-size", "0"], "batch size must be >= 1"),
])
def test_cli_zeroshot_bad_input(tiny_model, small_data_dir, capsys, argv, message):
    assert main(["eval", "zeroshot", "--model", str(tiny_model("llama")), "--data-dir", str(small_data_dir),
                 "--dtype", "float32", *argv]) == 2
    assert message in capsys.readouterr().err


def test_lm_eval_adapter_matches_the_engine(tiny_model):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from atomq.eval.lm_eval_adapter import AtomqLM
    from atomq.model.loader import load_model

    loaded = load_model(str(tiny_model("llama")), torch.float32)
    lm = AtomqLM(loaded=loaded, batch_size=2, max_length=16)
    pairs = [("the quick brown", " fox"), ("seven wizards ", "quietly judge"), ("", "river stones")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    ref = loglikelihoods(loaded.model, [encode_pair(loaded.tokenizer, *p) for p in pairs], progress=False)
    assert [g[0] for g in got] == pytest.approx([r.logprob for r in ref], abs=1e-5)
    # rolling: every token predicted exactly once, in windows of 16 inputs; the last window keeps a full context
    text = " ".join(["the quick brown fox jumps over a lazy dog"] * 5)
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 32
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    before = [lm.prefix_token_id] + ids  # before[i] is the token in front of ids[i]
    ref = 0.0
    for s in range(0, len(ids), 16):
        e = min(s + 16, len(ids))
        logp = torch.log_softmax(loaded.model(torch.tensor([before[max(0, e - 16):e]]))[0].float(), -1)  # [<=16, V]
        ref += logp[-(e - s):].gather(-1, torch.tensor(ids[s:e])[:, None]).sum().item()
    assert rolled == pytest.approx(ref, abs=1e-4)
    with pytest.raises(NotImplementedError):
        lm.generate_until([])


def test_engine_matches_lm_eval_hugging_face_model(tiny_model):
    """The oracle: lm-eval's own HF model scoring the same requests on the same tiny checkpoint."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from atomq.model.loader import load_model

    path = str(tiny_model("llama"))
    pairs = [("Question: the quick brown fox?\nAnswer:", " jumps over"), ("seven wizards ", "quietly judge"),
             ("a lazy dog", " river stones carry old songs"), ("under silver moons and", " hills")]
    hf = HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=2)
    want = hf.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    lm = load_model(path, torch.float32)
    got = loglikelihoods(lm.model, [encode_pair(lm.tokenizer, *p) for p in pairs], batch_size=3, progress=False)
    assert [g.logprob for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert [g.is_greedy for g in got] == [w[1] for w in want]
