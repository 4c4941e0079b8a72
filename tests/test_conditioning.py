"""The conditioning stage and the first stage, each in one module: training and sampling see the same thing."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest
import torch

from ldm_app import conditioning, first_stage
from ldm_app.errors import UserError
from ldm_app.fileio import check_output_file
from ldm_app.pipeline import LatentDiffusionPipeline


def test_training_text_states_equal_the_pipelines_prompt_embeddings(tiny_components):
    """c for a caption in training (conditioning.encode_text) is what the pipeline conditions on at sampling
    (diffusers' encode_prompt), and the null caption is its unconditional embedding."""
    pipe = LatentDiffusionPipeline(**tiny_components())
    captions = ["a red circle", "a small blue square on the left"]
    c = conditioning.encode_text(pipe.tokenizer, pipe.text_encoder, captions)
    embeds, negative = pipe.encode_prompt(captions, torch.device("cpu"), 1, True, None)
    torch.testing.assert_close(c, embeds)
    null = conditioning.encode_text(pipe.tokenizer, pipe.text_encoder, [conditioning.NULL_CAPTION] * 2)
    torch.testing.assert_close(null, negative)
    batched = conditioning.encode_text_batched(pipe.tokenizer, pipe.text_encoder, captions * 3, batch_size=4)
    torch.testing.assert_close(batched, torch.cat([c, c, c]))


def test_caption_dropout_uses_the_null_caption_at_rate_p():
    g = torch.Generator().manual_seed(0)
    dropped = conditioning.drop_captions(["x"] * 2000, 0.1, g)
    assert set(dropped) == {"x", conditioning.NULL_CAPTION}
    assert 0.08 < dropped.count(conditioning.NULL_CAPTION) / 2000 < 0.12


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_first_stage_answers_kl_and_vq_alike(tiny_components, kind):
    vae = tiny_components(vae=kind)["vae"]
    assert first_stage.is_vq(vae) == (kind == "vq")
    assert first_stage.downsampling_factor(vae) == 8 and first_stage.latent_channels(vae) == 4
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    mean, std = first_stage.latent_stats(vae, x)
    assert mean.shape == (2, 4, 8, 8) and (std is None) == (kind == "vq")
    x0 = first_stage.sample_x0(mean, std, vae.config.scaling_factor, torch.Generator().manual_seed(0))
    again = first_stage.sample_x0(mean, std, vae.config.scaling_factor, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x0, again)
    (a, codes), (b, _) = first_stage.reconstruct(vae, x), first_stage.reconstruct(vae, x)
    torch.testing.assert_close(a, b)  # deterministic: the posterior mode / the codes
    assert (codes is None) == (kind == "kl") and a.shape == x.shape and a.abs().max() <= 1
    assert first_stage.decode(vae, x0).shape == x.shape


def _import_cycles(root: Path) -> set[tuple[str, ...]]:
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for f in root.rglob("*.py"):
        mod = ".".join(("ldm_app",) + f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):  # module- and function-level imports
            if isinstance(node, ast.ImportFrom):
                base = pkg
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                target = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
                if target.startswith("ldm_app"):
                    graph[mod].add(target)
    found = set()
    for start in list(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start and len(path) > 1:
                    found.add(tuple(sorted(path)))
                elif nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return found


def test_the_package_has_no_import_loops():
    root = Path(first_stage.__file__).parent
    assert _import_cycles(root) == set()


def test_check_output_file_says_what_is_in_the_way(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_file("--json", tmp_path / "file" / "out.json")
    with pytest.raises(UserError, match="is a folder; expected a file path"):
        check_output_file("--json", tmp_path)
    check_output_file("--json", tmp_path / "new" / "out.json")
    assert (tmp_path / "new").is_dir()
