import math

import pytest
import torch
import torch.nn.functional as F

from sparsefit.errors import UsageError
from sparsefit.evaluation import perplexity, stream_windows
from tests.conftest import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_perplexity_matches_hand_computation(arch):
    model = tiny_model(arch)
    stream = torch.randint(0, 256, (3 * 32 + 5,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, stream, seq_len=32, batch_size=2, progress=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(3):
            ids = stream[w * 32 : (w + 1) * 32].unsqueeze(0)
            logits = model(ids).logits[0, :-1]
            nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += 31
    assert result.windows == 3 and result.tokens == count and result.seq_len == 32
    assert result.nll == pytest.approx(nll / count, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_batch_size_and_max_windows():
    model = tiny_model("llama")
    stream = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(1))
    one = perplexity(model, stream, seq_len=40, batch_size=1, progress=False)
    many = perplexity(model, stream, seq_len=40, batch_size=3, progress=False)
    assert one.windows == 5 and one.ppl == pytest.approx(many.ppl, rel=1e-5)
    assert perplexity(model, stream, seq_len=40, max_windows=2, progress=False).windows == 2


def test_bad_perplexity_input():
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="larger than the model's context \\(256\\)"):
        perplexity(model, torch.arange(1000), seq_len=512, progress=False)
    with pytest.raises(UsageError, match="dataset too short"):
        stream_windows(torch.arange(10), 32)
    with pytest.raises(UsageError, match="--max-windows"):
        stream_windows(torch.arange(100), 32, 0)
