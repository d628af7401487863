"""The second paper's own splits and protocol: its released token ids as a dataset, and documents
with near-duplicates removed."""

from __future__ import annotations

import pytest
import torch

from conftest import SHARED
from quantlens.evaluation.data import drop_near_duplicates, load_token_rows
from quantlens.pipeline.sweep import DatasetEntry
from quantlens.quantize.settings import ConfigError

QWEN = SHARED / "qerror" / "Qwen2.5-7B"


def test_the_released_files_load_as_rows_tagged_by_their_file():
    rows, tags = load_token_rows(str(QWEN))
    files = sorted(QWEN.glob("*.pt"))
    assert rows.shape == (1000 * len(files), 512) and rows.dtype == torch.long and int(rows.max()) < 151_936
    assert tags[0] == files[0].stem and tags[-1] == files[-1].stem and len(set(tags)) == len(files)
    one, tags1 = load_token_rows(str(files[0]), limit=7)
    assert torch.equal(one, torch.load(files[0])[:7]) and tags1 == [files[0].stem] * 7


def test_a_file_that_is_not_token_ids_is_one_clear_error(tmp_path):
    torch.save(torch.randn(3, 4), tmp_path / "x.pt")
    with pytest.raises(ConfigError, match=r"x\.pt holds a tensor of shape \(3, 4\) and dtype torch\.float32, not a \[rows, tokens\]"):
        load_token_rows(str(tmp_path / "x.pt"))
    (tmp_path / "y.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="y.pt is not a torch file of token ids"):
        load_token_rows(str(tmp_path / "y.pt"))
    with pytest.raises(ValueError, match="qerror: give path"):
        DatasetEntry(name="qerror")
    with pytest.raises(ValueError, match="qerror: seqlen do not apply"):
        DatasetEntry(name="qerror", path=str(QWEN), seqlen=512)


def test_near_duplicates_by_five_gram_jaccard():
    a = list(range(100))
    b = a[:90] + [999] * 10  # shares 86 of its 5-grams with a: Jaccard 86 / (96 + 92 − 86) > 0.1
    c = list(range(1000, 1100))
    d = a[:12] + list(range(2000, 2088))  # shares 8 5-grams: 8 / (96 + 96 − 8) < 0.1
    assert drop_near_duplicates([a, b, c, d]) == [0, 2, 3]
    assert drop_near_duplicates([a, a]) == [0]


def test_paper2_protocol_documents_without_near_duplicates(trained, tmp_path):
    from quantlens.evaluation.data import document_examples

    _, tok = trained("llama")
    text = (SHARED / "wikitext2" / "wiki.test.raw").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.strip().startswith("="))
    docs = [body[i * 3000:(i + 1) * 3000] for i in range(6)]
    f = tmp_path / "wiki.raw"  # six articles, the first two of them twice
    f.write_text("".join(f" = Article {k} = \n{d}\n" for k, d in enumerate(docs + docs[:2])))
    plain = document_examples(tok, "wikitext2", 128, path=str(f), use_cache=False)
    dedup = document_examples(tok, "wikitext2", 128, path=str(f), use_cache=False, dedup=True)
    assert plain.shape[0] == dedup.shape[0] + 2 and (dedup[:, 0] == tok.bos_token_id).all()
    assert DatasetEntry(name="fineweb", examples="paper2").examples == "paper2"
