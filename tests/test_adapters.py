"""ldm_app.adapters on the tiny components: real LoRA files (diffusers' format written by save_lora_weights, and
kohya's lora_unet_/lora_te_ format), textual-inversion files, and A1111 prompt weighting through compel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from conftest import TOKENIZER_DIR, build_tiny_components
from ldm_app.adapters import (
    load_embeddings,
    load_loras,
    parse_a1111_weights,
    parse_lora_spec,
    uses_weighting_syntax,
    weighted_prompt_embeds,
)
from ldm_app.errors import UserError

PROMPT = "a red circle"
RANK = 4


def make_pipe(cls=None):
    """The tiny pipeline as `cls` (StableDiffusionPipeline or a subclass of it), with a tokenizer of its own:
    conftest shares one instance, and textual inversion adds tokens to the tokenizer it is given. (Not a deepcopy:
    a deep-copied transformers-5 CLIPTokenizer decodes "a</w>red</w>", which breaks compel's embedding expansion.)"""
    if cls is None:
        from ldm_app.pipeline import LatentDiffusionPipeline as cls
    components = build_tiny_components()
    components["tokenizer"] = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    pipe = cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, **kwargs) -> np.ndarray:
    kwargs = {"prompt": PROMPT, **kwargs}
    generator = torch.Generator().manual_seed(0)
    return pipe(**kwargs, num_inference_steps=2, guidance_scale=3.0, generator=generator, output_type="np").images[0]


def text_embeds(pipe, prompt=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


def has_peft_layers(pipe) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())


def peft_lora(seed: int, unet=None, text_encoder=None) -> tuple[dict, dict]:
    """Random non-zero LoRA weights (peft's key names) on the tiny U-Net's attention and the text encoder's."""
    components = build_tiny_components()
    unet = unet if unet is not None else components["unet"]
    text_encoder = text_encoder if text_encoder is not None else components["text_encoder"]
    torch.manual_seed(seed)
    # init_lora_weights=False: lora_B random too, so the LoRA really changes the model. inject_adapter_in_model,
    # not text_encoder.add_adapter: transformers 5.24's add_adapter wants peft >= 0.22 and PyPI has 0.21.2
    def config(targets):
        return LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights=False, target_modules=targets)

    unet = inject_adapter_in_model(config(["to_q", "to_k", "to_v", "to_out.0"]), unet)
    text_encoder = inject_adapter_in_model(config(["q_proj", "k_proj", "v_proj", "out_proj"]), text_encoder)
    for module in (unet, text_encoder):  # diffusers-scale weights: ~0.1 changes the tiny model's image clearly
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.data.mul_(0.5)
    return get_peft_model_state_dict(unet), get_peft_model_state_dict(text_encoder)


def save_diffusers_lora(folder, name, unet_sd, te_sd=None):
    """As diffusers' training scripts save a LoRA: peft state dicts converted, then save_lora_weights."""
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(unet_sd),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(te_sd) if te_sd else None,
        weight_name=name,
    )
    return folder / name


def save_kohya_lora(path, unet_sd, te_sd, alpha: float):
    """kohya / A1111 naming: lora_unet_<module with _>.lora_down/.lora_up/.alpha, text encoder as
    lora_te_text_model_...; the effective scale is alpha/rank, so lora_up is divided by it to mean the same."""
    tensors = {}
    for prefix, sd in (("lora_unet_", unet_sd), ("lora_te_text_model_", te_sd)):
        for key, value in sd.items():
            module, kind = key.rsplit(".lora_", 1)
            name = prefix + module.replace(".", "_")
            if kind == "A.weight":
                tensors[f"{name}.lora_down.weight"] = value.contiguous()
            else:
                tensors[f"{name}.lora_up.weight"] = (value / (alpha / RANK)).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    unet_a, te_a = peft_lora(seed=1)
    unet_b, _ = peft_lora(seed=2)
    unet16 = UNet2DConditionModel(  # the tiny U-Net but for a 16-wide text encoder: its attn2 to_k/to_v take 16
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8,
    )
    unet_misfit, _ = peft_lora(seed=3, unet=unet16)
    return {
        "a": save_diffusers_lora(folder, "style_a.safetensors", unet_a, te_a),
        "a_kohya": save_kohya_lora(folder / "style_a_kohya.safetensors", unet_a, te_a, alpha=2.0),
        "b": save_diffusers_lora(folder, "style_b.safetensors", unet_b),
        "misfit": save_diffusers_lora(folder, "for_other_model.safetensors", unet_misfit),
        "extra_layers": _with_extra_layer(folder, unet_a),
    }


def _with_extra_layer(folder, unet_sd):
    """A LoRA that fits in part: one more attention block than the tiny U-Net has."""
    sd = dict(unet_sd)
    for key, value in unet_sd.items():
        if key.startswith("down_blocks.1.attentions.0."):
            sd[key.replace("down_blocks.1.attentions.0.", "down_blocks.1.attentions.5.")] = value.clone()
    return save_diffusers_lora(folder, "extra_layers.safetensors", sd)


@pytest.fixture(scope="module")
def base_image():
    return image(make_pipe())


def test_parse_lora_spec():
    assert parse_lora_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_spec("style.safetensors:0.6") == ("style.safetensors", 0.6)
    assert parse_lora_spec("d/style.safetensors:-1") == ("d/style.safetensors", -1.0)
    assert parse_lora_spec("C:\\loras\\style.safetensors") == ("C:\\loras\\style.safetensors", 1.0)
    assert parse_lora_spec("C:\\loras\\style.safetensors:.5") == ("C:\\loras\\style.safetensors", 0.5)
    assert parse_lora_spec("a:b/style.safetensors") == ("a:b/style.safetensors", 1.0)
    for bad in ("style.safetensors:nan", "style.safetensors:inf", "style.safetensors:1e9", ":0.5", ""):
        with pytest.raises(UserError) as e:
            parse_lora_spec(bad)
        assert "\n" not in str(e.value)


def test_lora_changes_image_scale_zero_is_base(loras, base_image):
    pipe = make_pipe()
    before = text_embeds(pipe)
    names = load_loras(pipe, [(loras["a"], 1.0)])
    assert pipe.get_active_adapters() == names
    assert not torch.allclose(text_embeds(pipe), before, atol=1e-3)  # its text-encoder part is in use
    assert np.abs(image(pipe) - base_image).max() > 0.02

    pipe = make_pipe()
    load_loras(pipe, [(str(loras["a"]), 0.0)])
    np.testing.assert_allclose(image(pipe), base_image, atol=1e-5)


def test_kohya_lora_equals_diffusers_format(loras, base_image):
    """diffusers converts the kohya names and honours alpha/rank: the same weights give the same image."""
    diffusers_format, kohya = make_pipe(), make_pipe()
    load_loras(diffusers_format, [(loras["a"], 0.8)])
    load_loras(kohya, [(loras["a_kohya"], 0.8)])
    assert set(kohya.get_list_adapters()) == {"unet", "text_encoder"}
    torch.testing.assert_close(text_embeds(kohya), text_embeds(diffusers_format), atol=1e-5, rtol=1e-5)
    kohya_image = image(kohya)
    np.testing.assert_allclose(kohya_image, image(diffusers_format), atol=1e-5)
    assert np.abs(kohya_image - base_image).max() > 0.02


def test_two_loras_combine(loras):
    only_a = make_pipe()
    load_loras(only_a, [(loras["a"], 1.0)])
    a_and_zero_b, both = make_pipe(), make_pipe()
    names = load_loras(both, [(loras["a"], 1.0), (loras["b"], 1.0)])
    load_loras(a_and_zero_b, [(loras["a"], 1.0), (loras["b"], 0.0)])
    assert len(set(names)) == 2 and sorted(both.get_active_adapters()) == sorted(names)
    np.testing.assert_allclose(image(a_and_zero_b), image(only_a), atol=1e-5)  # each LoRA has its own scale
    assert np.abs(image(both) - image(only_a)).max() > 0.02


def test_misfitting_lora_refused_and_pipeline_unchanged(loras, base_image):
    pipe = make_pipe()
    with pytest.raises(UserError) as e:
        load_loras(pipe, [(loras["a"], 1.0), (loras["misfit"], 1.0)])  # the first loads, the second does not
    message = str(e.value)
    assert "\n" not in message and str(loras["misfit"]) in message
    assert "do not fit" in message and "[4, 16]" in message and "[4, 32]" in message
    assert pipe.get_list_adapters() == {} and not has_peft_layers(pipe)
    np.testing.assert_allclose(image(pipe), base_image, atol=1e-6)
    load_loras(pipe, [(loras["a"], 1.0)])  # and a later load still works
    assert np.abs(image(pipe) - base_image).max() > 0.02


def test_bad_lora_files_refused_in_one_line(loras, tmp_path):
    pickled = tmp_path / "style.pt"
    pickled.write_bytes(b"\x80\x04not really")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    not_lora = tmp_path / "unet_weights.safetensors"
    save_file({"conv_in.weight": torch.zeros(3, 3)}, str(not_lora))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"unet.no_such.block.lora.down.weight": torch.zeros(4, 8),
               "unet.no_such.block.lora.up.weight": torch.zeros(8, 4)}, str(foreign))
    cases = {
        tmp_path / "missing.safetensors": "no such file",
        pickled: "only .safetensors",
        garbage: "not a readable safetensors file",
        not_lora: "no LoRA weights",
        foreign: "not found in the base model",
        loras["extra_layers"]: "layers this model does not have",
    }
    pipe = make_pipe()
    for path, expected in cases.items():
        with pytest.raises(UserError) as e:
            load_loras(pipe, [(path, 1.0)])
        message = str(e.value)
        assert "\n" not in message and str(path) in message and expected in message, message
        assert pipe.get_list_adapters() == {} and not has_peft_layers(pipe), path


def test_loras_work_on_a_subclass(loras, base_image):
    """The helper's class parameter: anything derived from StableDiffusionPipeline gets the same behaviour."""

    class Derived(StableDiffusionPipeline):
        pass

    pipe = make_pipe(Derived)
    load_loras(pipe, [(loras["a"], 1.0)])
    reference = make_pipe()
    load_loras(reference, [(loras["a"], 1.0)])
    np.testing.assert_allclose(image(pipe), image(reference), atol=1e-6)


# ------------------------------------------------------------------------------------------------ embeddings


def test_embeddings_add_tokens_that_change_the_prompt(tmp_path):
    torch.manual_seed(0)
    a1111 = tmp_path / "shinystyle.safetensors"  # kohya/A1111 layout, two vectors
    save_file({"emb_params": torch.randn(2, 32)}, str(a1111))
    learned = tmp_path / "learned_embeds.safetensors"  # diffusers' textual_inversion.py layout
    save_file({"<toy>": torch.randn(32)}, str(learned))
    flattened = tmp_path / "old.safetensors"
    save_file({"string_to_param.*": torch.randn(1, 32)}, str(flattened))

    pipe = make_pipe()
    prompt = "a shinystyle <toy> circle oldthing"
    before = text_embeds(pipe, prompt)
    vocab_before = len(pipe.tokenizer)
    tokens = load_embeddings(pipe, [a1111, learned, flattened], tokens=[None, "<toy>", "oldthing"])
    assert tokens == ["shinystyle", "<toy>", "oldthing"]
    assert len(pipe.tokenizer) == vocab_before + 4  # shinystyle, shinystyle_1, <toy>, oldthing
    toy_id = pipe.tokenizer.convert_tokens_to_ids("<toy>")
    weights = pipe.text_encoder.get_input_embeddings().weight
    from safetensors.torch import load_file

    torch.testing.assert_close(weights[toy_id].detach(), load_file(str(learned))["<toy>"])
    after = text_embeds(pipe, prompt)
    assert not torch.allclose(after, before, atol=1e-3)
    # compel's embeddings expand the multi-vector token the way diffusers' encode_prompt does
    weighted, _ = weighted_prompt_embeds(pipe, prompt)
    torch.testing.assert_close(weighted, after, atol=1e-5, rtol=1e-5)


def test_embedding_errors_leave_the_tokenizer_alone(tmp_path):
    wide = tmp_path / "sd15style.safetensors"
    save_file({"emb_params": torch.randn(1, 768)}, str(wide))
    clash = tmp_path / "red.safetensors"
    save_file({"emb_params": torch.randn(1, 32)}, str(clash))
    good = tmp_path / "goodstyle.safetensors"
    save_file({"emb_params": torch.randn(1, 32)}, str(good))
    pipe = make_pipe()
    size = len(pipe.tokenizer)
    for paths, expected in (([good, wide], "768 wide"), ([clash], "already a word")):
        with pytest.raises(UserError) as e:
            load_embeddings(pipe, paths)
        assert "\n" not in str(e.value) and str(paths[-1]) in str(e.value) and expected in str(e.value)
        assert len(pipe.tokenizer) == size and pipe.text_encoder.get_input_embeddings().weight.shape[0] == size


# ------------------------------------------------------------------------------------------- prompt weighting


def test_a1111_reading():
    assert parse_a1111_weights("a (red:1.5) circle") == [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]
    assert parse_a1111_weights("((red))")[0][1] == pytest.approx(1.21)
    assert parse_a1111_weights("[red]")[0][1] == pytest.approx(1 / 1.1)
    assert parse_a1111_weights("(a [b] c:2)") == [("a ", 2.0), ("b", pytest.approx(2 / 1.1)), (" c", 2.0)]
    assert parse_a1111_weights(r"c++ \(literal\) well-lit :)") == [("c++ (literal) well-lit :)", 1.0)]
    assert uses_weighting_syntax("a (red:1.0) circle") and uses_weighting_syntax("[red]")
    assert uses_weighting_syntax(r"a \(b\)")
    assert not uses_weighting_syntax("a red circle, c++ :) well-lit")


def test_weighted_prompt_embeds():
    pipe = make_pipe()
    plain, plain_negative = weighted_prompt_embeds(pipe, [PROMPT], None)
    torch.testing.assert_close(plain, text_embeds(pipe), atol=1e-6, rtol=1e-6)  # as diffusers' own encoding
    torch.testing.assert_close(plain_negative, text_embeds(pipe, ""), atol=1e-6, rtol=1e-6)
    weighted, _ = weighted_prompt_embeds(pipe, "a (red:1.5) circle")
    neutral, _ = weighted_prompt_embeds(pipe, "a (red:1.0) circle")
    torch.testing.assert_close(neutral, plain, atol=1e-6, rtol=1e-6)
    assert (weighted - plain).abs().max() > 0.05
    lighter, _ = weighted_prompt_embeds(pipe, "a [red] circle")
    assert (lighter - plain).abs().max() > 0.01 and not torch.allclose(lighter, weighted)

    # a long prompt is chunked, not cut, and its negative padded to the same length; the pipeline takes both
    long = ", ".join(["a (red:1.2) circle"] * 30)
    embeds, negative = weighted_prompt_embeds(pipe, [long, PROMPT], ["blurry", ""])
    assert embeds.shape == negative.shape and embeds.shape[:2] == (2, 154)
    out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=1, output_type="np")
    assert out.images.shape == (2, 64, 64, 3) and np.isfinite(out.images).all()
    # a plain prompt through prompt_embeds gives the image diffusers gives for the text
    p, n = weighted_prompt_embeds(pipe, PROMPT)
    from_embeds = image(pipe, prompt=None, prompt_embeds=p, negative_prompt_embeds=n)
    np.testing.assert_allclose(from_embeds, image(pipe), atol=1e-6)
