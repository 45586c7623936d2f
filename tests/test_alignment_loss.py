"""The activation-alignment term (``WriteConfig.alignment_weight``, ``gradmem_fast.alignment``) against an
independent eager loop in fp64: one document at a time, no padding, the model's own forward with
``output_hidden_states=True`` on [M ; E(c)] and on E(c) alone, the cross-entropy and the cosine distance
written out, the gradient by autograd, the update by formula. Whole writes (reference, cramming slots with
continuous batching) on ragged documents, given tokens, both optimizers; alpha = 0 is the plain path; the
engine refuses the option; the command line's flags reach the config and bad values are refused."""

import math

import pytest
import torch

from gradmem_fast import alignment, cli, reference
from gradmem_fast.config import StopRule, WriteConfig
from gradmem_fast.errors import UserError
from gradmem_fast.writer import MemoryWriter
from helpers import assert_close, random_documents, right_padded, seeded_initial_memory
from tiny_models import VOCAB, tiny_model

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# The oracle: shares no code with the package.


def _oracle_terms(model, M, tokens, given, layers):
    """(mean CE over tokens given..n-1, mean over those tokens and the last ``layers`` layers of 1 - cos)."""
    m, n = M.shape[0], tokens.shape[0]
    E = model.get_input_embeddings()(tokens)
    run = model(inputs_embeds=torch.cat([M, E])[None], output_hidden_states=True)
    with torch.no_grad():
        text = model(inputs_embeds=E[None], output_hidden_states=True).hidden_states
    L = len(text) - 1
    N = L if layers is None else layers
    if n <= given:
        zero = (M * 0).sum()
        return zero, zero
    logits = run.logits[0, m - 1 + given : m - 1 + n]
    logp = logits - logits.logsumexp(dim=-1, keepdim=True)
    ce = -logp[torch.arange(n - given), tokens[given:]].sum() / (n - given)
    total = 0
    for layer in range(L + 1 - N, L + 1):
        for j in range(given, n):
            h, t = run.hidden_states[layer][0, m + j], text[layer][0, j]
            total = total + 1 - (h @ t) / (torch.sqrt(h @ h) * torch.sqrt(t @ t))
    return ce, total / (N * (n - given))


def _oracle_write(model, tokens, M0, steps, lr, alpha, layers, given, optimizer, betas=(0.9, 0.999)):
    """K steps on one document: returns (memory, CE per step, alignment per step, grad norm per step)."""
    M, m1, v1 = M0.clone(), None, None
    ces, aligns, norms = [], [], []
    for k in range(1, steps + 1):
        M = M.detach().requires_grad_(True)
        ce, a = _oracle_terms(model, M, tokens, given, layers)
        (g,) = torch.autograd.grad(ce + alpha * a, M)
        ces.append(float(ce.detach()))
        aligns.append(float(a.detach()))
        norms.append(float(torch.sqrt((g * g).sum())))
        with torch.no_grad():
            if optimizer == "sgd":
                M = M - lr * g
            else:
                g = torch.clamp(g, -10.0, 10.0)
                b1, b2 = betas
                m1 = (1 - b1) * g if m1 is None else b1 * m1 + (1 - b1) * g
                v1 = (1 - b2) * g * g if v1 is None else b2 * v1 + (1 - b2) * g * g
                vh = torch.clamp(v1 / (1 - b2**k), min=1e-8)
                M = M - lr * (m1 / (1 - b1**k)) / (torch.sqrt(vh) + 1e-8)
    return M.detach(), ces, aligns, norms


CASES = [
    # family, optimizer, given, layers, alpha
    ("llama", "adam", 1, None, 0.7),
    ("llama", "sgd", 0, 1, 2.5),
    ("gpt2", "adam", 0, 2, 1.3),
    ("gpt_neox", "sgd", 1, 1, 0.4),
]


@pytest.mark.parametrize("family,optimizer,given,layers,alpha", CASES)
def test_reference_write_matches_the_oracle(family, optimizer, given, layers, alpha):
    """Ragged documents (one of a single token: nothing scored with given=1), 3 steps: memories, CE losses,
    alignment terms and gradient norms equal the oracle's, fp64."""
    model = tiny_model(family)
    docs = random_documents([6, 1, 9, 4], VOCAB, seed=11)
    ids, mask = right_padded(docs)
    lr = 0.05 if optimizer == "adam" else 0.3
    config = WriteConfig(
        num_memory_tokens=3,
        steps=3,
        lr=lr,
        optimizer=optimizer,
        given_tokens=given,
        alignment_weight=alpha,
        alignment_layers=layers,
        init_std=0.5,
        seed=5,
    )
    M0 = seeded_initial_memory(model, config)
    result = reference.write(model, ids, mask, config=config)
    assert result.alignment_losses is not None and result.alignment_losses.shape == (3, 4)
    for b, doc in enumerate(docs):
        M, ces, aligns, norms = _oracle_write(model, doc, M0, 3, lr, alpha, layers, given, optimizer)
        assert_close(result.memory[b], M, name=f"memory {b}")
        assert_close(result.losses[:, b].double(), torch.tensor(ces), torch.float32, name=f"losses {b}")
        assert_close(result.alignment_losses[:, b].double(), torch.tensor(aligns), torch.float32, name=f"align {b}")
        assert_close(result.grad_norms[:, b].double(), torch.tensor(norms), torch.float32, name=f"norms {b}")
    # The single-token document with a given token has nothing scored: zero terms, an untouched memory.
    if given:
        assert float(result.alignment_losses[:, 1].abs().max()) == 0.0
        assert torch.equal(result.memory[1], M0)
    # The term moved the memories: the same write without it ends elsewhere.
    plain = reference.write(model, ids, mask, config=WriteConfig(**{**_fields(config), "alignment_weight": 0.0}))
    assert (plain.memory - result.memory).abs().max() > 1e-6


def _fields(config):
    out = {f: getattr(config, f) for f in config.__dataclass_fields__}
    out["alignment_layers"] = None
    return out


def test_the_term_is_the_cosine_distance_of_the_text_run():
    """alignment_losses of a one-step write equals the formula on the oracle's hidden states at memory 0,
    and its gradient direction is what the step follows: alpha = 1e6 makes the objective the term alone, and
    the term decreases after a small SGD step."""
    model = tiny_model("llama")
    docs = random_documents([7, 5], VOCAB, seed=3)
    ids, mask = right_padded(docs)
    config = WriteConfig(num_memory_tokens=2, steps=4, lr=1e-7, alignment_weight=1e6, init_std=0.5)
    result = reference.write(model, ids, mask, config=config)
    M0 = seeded_initial_memory(model, config)
    for b, doc in enumerate(docs):
        want = _oracle_terms(model, M0, doc, 0, None)[1].detach()
        assert abs(float(result.alignment_losses[0, b]) - float(want)) <= 1e-6 * float(want)
        assert result.alignment_losses[-1, b] < result.alignment_losses[0, b]


def test_alpha_zero_is_the_plain_path():
    """alignment_weight=0 is the default config (nothing changes, nothing reported), and the alignment
    path's own cross-entropy at the first step (same memory) is bit-identical to the plain path's: asking
    the backbone for its hidden states does not change its last one."""
    model = tiny_model("qwen2")
    docs = random_documents([5, 8, 2], VOCAB, seed=7)
    ids, mask = right_padded(docs)
    base = WriteConfig(num_memory_tokens=2, steps=2, lr=0.1, optimizer="adam")
    assert WriteConfig(num_memory_tokens=2, steps=2, lr=0.1, optimizer="adam", alignment_weight=0.0) == base
    plain = reference.write(model, ids, mask, config=base)
    assert plain.alignment_losses is None
    aligned = reference.write(model, ids, mask, config=WriteConfig(**{**_fields(base), "alignment_weight": 0.5}))
    assert torch.equal(aligned.losses[0], plain.losses[0])


@pytest.mark.parametrize("given,slots", [(1, 2), (0, None)])
def test_cramming_slots_match_the_oracle(given, slots, monkeypatch):
    """The cramming loop (torch backend, continuous batching with 2 slots: documents enter as others leave,
    so batches are rebuilt) with a stop rule that holds only for a document with nothing scored: every other
    document takes K steps and ends at the
    oracle's memory; the stats' loss is the oracle's cross-entropy of the final memory (not the objective);
    the text run is computed once per document (rows counted across the rebuilds)."""
    model = tiny_model("llama")
    lengths = [3, 8, 5, 1, 6]
    docs = random_documents(lengths, VOCAB, seed=21)
    K, alpha, lr = 4, 0.9, 0.05
    config = WriteConfig(
        num_memory_tokens=2,
        steps=K,
        lr=lr,
        optimizer="adam",
        given_tokens=given,
        alignment_weight=alpha,
        init_std=0.5,
        stop=StopRule(loss=0.0, exact=False, check_every=2),
    )
    counted = []
    real = alignment.text_states

    def counting(model, embeds, mask, layers):
        counted.append(int(mask.shape[0]))
        return real(model, embeds, mask, layers)

    monkeypatch.setattr(alignment, "text_states", counting)
    writer = MemoryWriter(model, config, backend="torch")
    M0 = seeded_initial_memory(model, config)
    out = list(writer.write_many(docs, slots=slots, stats=True, batch_tokens=10_000))
    assert sum(counted) == len(docs)
    for b, doc in enumerate(docs):
        if len(doc) <= given:  # nothing scored: loss 0 <= 0 holds at the first check, the memory never moved
            assert out[b].stopped and torch.equal(out[b].memory, M0)
            continue
        M, _, _, _ = _oracle_write(model, doc, M0, K, lr, alpha, None, given, "adam")
        assert out[b].steps == K and not out[b].stopped
        assert_close(out[b].memory, M, name=f"memory {b}")
        ce, _ = _oracle_terms(model, M, doc, given, None)
        assert abs(out[b].loss - float(ce)) <= 1e-10 * max(1.0, abs(float(ce)))


def test_stop_rules_use_the_cross_entropy():
    """A loss stop rule stops each document at the first check whose cross-entropy is at most the threshold,
    as the oracle's CE says (the objective, CE + alpha A, would cross it later or never)."""
    model = tiny_model("llama")
    docs = random_documents([6, 4], VOCAB, seed=2)
    K, alpha, lr = 12, 3.0, 0.1
    plain = WriteConfig(num_memory_tokens=2, steps=K, lr=lr, optimizer="adam", alignment_weight=alpha, init_std=0.5)
    M0 = seeded_initial_memory(model, plain)
    for doc in docs:
        _, ces, aligns, _ = _oracle_write(model, doc, M0, K, lr, alpha, None, 0, "adam")
        threshold = (ces[0] + min(ces)) / 2
        want = next(k for k, c in enumerate(ces) if c <= threshold)
        assert ces[want] + alpha * aligns[want] > threshold  # the objective would not have stopped here
        config = WriteConfig(**{**_fields(plain), "stop": StopRule(loss=threshold, exact=False, check_every=1)})
        result = MemoryWriter(model, config, backend="torch").write(doc[None])
        assert int(result.stats.steps[0]) == want and bool(result.stats.stopped[0])


def test_engine_refuses_the_term():
    """backend='triton' (the packed engine) refuses alignment_weight > 0 at writer creation, naming the option
    and the backend to use; the engine's own entry refuses it too (never a write without the term)."""
    from gradmem_fast import engine

    model = tiny_model("llama", dtype=torch.float32)
    config = WriteConfig(num_memory_tokens=2, steps=1, alignment_weight=0.5)
    with pytest.raises(ValueError, match=r"alignment_weight=0.5.*backend='torch'"):
        MemoryWriter(model, config, backend="triton")
    with pytest.raises(ValueError, match="alignment_weight"):
        engine.write_packed(model, None, torch.zeros(1, 2, 32), config, None, None, "triton")
    MemoryWriter(model, WriteConfig(num_memory_tokens=2, steps=1), backend="triton")  # the plain write is fine


def test_layers_beyond_the_model_are_refused():
    model = tiny_model("llama")  # 2 layers
    ids, mask = right_padded(random_documents([4], VOCAB, seed=0))
    config = WriteConfig(num_memory_tokens=1, steps=1, alignment_weight=1.0, alignment_layers=3)
    with pytest.raises(ValueError, match="alignment_layers=3 exceeds the 2 layers"):
        reference.write(model, ids, mask, config=config)


@pytest.mark.parametrize(
    "kwargs,error,needle",
    [
        (dict(alignment_weight=-0.1), ValueError, "alignment_weight must be >= 0"),
        (dict(alignment_weight=math.nan), ValueError, "alignment_weight must be finite"),
        (dict(alignment_weight=math.inf), ValueError, "alignment_weight must be finite"),
        (dict(alignment_weight="1"), TypeError, "alignment_weight must be a number"),
        (dict(alignment_weight=True), TypeError, "alignment_weight must be a number"),
        (dict(alignment_weight=1.0, alignment_layers=0), ValueError, "alignment_layers must be >= 1"),
        (dict(alignment_weight=1.0, alignment_layers=1.5), TypeError, "alignment_layers must be an int"),
        (dict(alignment_layers=2), ValueError, "alignment_layers is only meaningful with alignment_weight > 0"),
    ],
)
def test_bad_config_values_are_refused(kwargs, error, needle):
    with pytest.raises(error, match=needle):
        WriteConfig(**kwargs)


def _parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_flags_reach_the_config():
    from gradmem_fast import capacity

    args = _parse("write", "--model", "m", "--output", "o", "--alignment-weight", "0.25", "--alignment-layers", "3")
    config = cli._write_config(args)
    assert (config.alignment_weight, config.alignment_layers) == (0.25, 3)
    args = _parse("capacity", "--model", "m", "--memory-tokens", "1", "--alignment-weight", "2")
    config = capacity._config(args)
    assert (config.alignment_weight, config.alignment_layers) == (2.0, None)
    assert cli._write_config(_parse("write", "--model", "m", "--output", "o")).alignment_weight == 0.0


@pytest.mark.parametrize("command", ["write", "capacity"])
@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--alignment-weight", "-1"], "--alignment-weight must be a finite number >= 0"),
        (["--alignment-weight", "nan"], "--alignment-weight must be a finite number >= 0"),
        (["--alignment-weight", "1", "--alignment-layers", "0"], "--alignment-layers must be >= 1"),
        (["--alignment-layers", "2"], "--alignment-layers needs --alignment-weight > 0"),
        (["--alignment-weight", "1", "--backend", "triton"], "--alignment-weight needs --backend torch"),
    ],
)
def test_bad_flags_are_refused(command, extra, needle):
    from gradmem_fast import capacity

    if command == "write":
        args, build = _parse("write", "--model", "m", "--output", "o", *extra), cli._write_config
    else:
        args, build = _parse("capacity", "--model", "m", "--memory-tokens", "1", *extra), capacity._config
    with pytest.raises(UserError, match=needle):
        build(args)


def test_write_command_end_to_end(tmp_path):
    """``gradmem-fast write --alignment-weight 0.5 --alignment-layers 1`` on a tiny saved model: the file's
    config records the term, and each memory is the API's write of that document alone with the same config
    (fp32)."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradmem_fast import fileio
    from tiny_local import save_tiny, sentence

    model_dir = save_tiny(str(tmp_path / "model"))
    texts = [sentence(3 + 2 * i, i) for i in range(3)]
    inp = tmp_path / "docs.jsonl"
    inp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    out = str(tmp_path / "mem.safetensors")
    common = ["--steps", "3", "--memory-tokens", "2", "--lr", "0.05", "--stop", "none", "--given-tokens", "1"]
    argv = ["write", "--model", model_dir, "--input", str(inp), "--output", out, "--quiet", *common]
    assert cli.main([*argv, "--alignment-weight", "0.5", "--alignment-layers", "1"]) == 0
    f = fileio.MemoryFile(out)
    recorded = json.loads(f.metadata["config"])
    assert (recorded["alignment_weight"], recorded["alignment_layers"]) == (0.5, 1)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = WriteConfig(num_memory_tokens=2, steps=3, lr=0.05, optimizer="adam", given_tokens=1)
    config = WriteConfig(**{**_fields(config), "alignment_weight": 0.5, "alignment_layers": 1})
    writer = MemoryWriter(model, config, backend="torch")
    for row, text in enumerate(texts):
        ids = torch.tensor([tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]])
        assert_close(f.rows([row])[0], writer.write(ids).memory[0], name=f"memory {row}")
