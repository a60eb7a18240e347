"""The inverted file of co-attention search (Hu & Bors 2023, sec. 5.2)."""
import numpy as np

from glimr.rerank.invfile import InvertedFile

PAD = 65535


def _forward(m=400, n_words=300, w_max=12, seed=0):
    rng = np.random.default_rng(seed)
    words = np.full((m, w_max), PAD, np.int64)
    for i in range(m):
        k = rng.integers(0, w_max + 1)                     # some images have no word at all
        # Zipf-like word frequencies, as real visual words
        w = np.unique(np.minimum(rng.zipf(1.3, size=k), n_words) - 1)
        words[i, :len(w)] = w
    return words


def test_never_drops_an_image_that_shares_a_word():
    words = _forward()
    inv = InvertedFile.from_words(words, 300, PAD)
    rng = np.random.default_rng(1)
    for _ in range(50):
        q = rng.integers(0, 300, size=rng.integers(1, 20))
        brute = {i for i in range(len(words)) if set(words[i][words[i] != PAD].tolist()) & set(q.tolist())}
        got = set(inv.candidates(q).tolist())
        assert got == brute                                # nothing dropped, nothing extra
        votes = inv.votes(q)
        for i in list(brute)[:10]:
            assert votes[i] == len(set(words[i].tolist()) & set(q.tolist()))


def test_live_rows_only_and_persistence(tmp_path):
    words = _forward(m=100, seed=2)
    live = np.arange(0, 100, 2)
    inv = InvertedFile.from_words(words, 300, PAD, rows=live)
    q = np.arange(300)
    has_word = {i for i in range(100) if (words[i] != PAD).any()}
    assert set(inv.candidates(q).tolist()) == has_word & set(live.tolist())
    # postings: word-major, each list sorted, offsets consistent
    for w in range(300):
        lst = inv.postings[inv.offsets[w]:inv.offsets[w + 1]]
        assert (np.diff(lst) > 0).all()
    state = {"n_vectors": 100, "n_live": 50}
    inv.save(tmp_path, state)
    back = InvertedFile.load(tmp_path, state)
    assert back is not None and (back.postings == inv.postings).all() and (back.offsets == inv.offsets).all()
    assert InvertedFile.load(tmp_path, {"n_vectors": 101, "n_live": 50}) is None    # stale cache: rebuilt
    # words outside the codebook and padding are ignored
    assert inv.candidates(np.array([-1, 300, PAD])).size == 0
