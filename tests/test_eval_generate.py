"""Generation and option scoring on a tiny random VLM stand-in: KV cache equals full recompute, scoring finds a planted answer."""

from __future__ import annotations

import torch
from PIL import Image

from visprior.eval.generate import chat_prompt, encode_prompt, generate, pick_option, score_options
from visprior.eval.toymodels import TinyVLM


def _img(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (8, 8), color)


def _greedy_no_cache(model: TinyVLM, prompt: str, images: list[Image.Image], steps: int) -> list[int]:
    """Reference decoding: recompute the whole sequence every step, one prompt at a time, no padding."""
    ids = torch.tensor([encode_prompt(model, prompt)])
    pv = torch.stack([model.image_transform(i) for i in images]) if images else None
    out: list[int] = []
    for _ in range(steps):
        logits = model.language_model(inputs_embeds=model.embed(ids, pv)).logits[0, -1]
        nxt = int(logits.argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_kv_cache_generation_matches_full_recompute_batched():
    model = TinyVLM(seed=1)
    prompts = [
        chat_prompt("<image>\nwhat colour?"),
        chat_prompt("hi"),
        chat_prompt("<image> and <image>: which is larger, the first or the second one?"),
    ]
    images = [[_img((255, 0, 0))], [], [_img((0, 0, 255)), _img((0, 255, 0))]]
    got = generate(model, prompts, images, max_new_tokens=6, stop=(), batch_size=3)
    for prompt, imgs, text in zip(prompts, images, got):
        ref = model.tokenizer.decode(_greedy_no_cache(model, prompt, imgs, 6)).replace("<pad>", "").strip()
        assert text == ref
    no_cache = generate(model, prompts, images, max_new_tokens=6, stop=(), batch_size=3, use_cache=False)
    assert no_cache == got
    one_by_one = generate(model, prompts, images, max_new_tokens=6, stop=(), batch_size=1)
    assert one_by_one == got


def test_images_change_the_output_and_counts_are_checked():
    model = TinyVLM(seed=1)
    prompt = chat_prompt("<image>")
    a = score_options(model, [prompt], [["x"]], [[_img((255, 0, 0))]])[0][0]
    b = score_options(model, [prompt], [["x"]], [[_img((0, 0, 255))]])[0][0]
    assert a.sum_logprob != b.sum_logprob
    try:
        generate(model, [prompt], [[]])
    except ValueError as e:
        assert "1 <image> marks but 0 images" in str(e)
    else:
        raise AssertionError("missing image not detected")


def test_stop_strings_cut_the_output():
    model = TinyVLM(seed=1)
    full = generate(model, [chat_prompt("go")], max_new_tokens=8, stop=())[0]
    assert len(full) >= 2
    cut = generate(model, [chat_prompt("go")], max_new_tokens=8, stop=(full[1],))[0]
    assert cut == full[: full.index(full[1])].strip()


def test_sampling_is_seeded():
    model = TinyVLM(seed=1)
    kw = {"max_new_tokens": 6, "do_sample": True, "stop": (), "seed": 3}
    assert generate(model, [chat_prompt("a")], **kw) == generate(model, [chat_prompt("a")], **kw)


def test_likelihood_scoring_picks_planted_answer():
    model = TinyVLM(seed=2)
    prompt = chat_prompt("<image>\nwhat shape?")
    image = [_img((200, 30, 30))]
    ids = torch.tensor([encode_prompt(model, prompt + "cube")])
    pv = torch.stack([model.image_transform(image[0])])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    n_prompt = len(encode_prompt(model, prompt))
    for _ in range(30):
        logits = model.language_model(inputs_embeds=model.embed(ids, pv)).logits[0, n_prompt - 1 : -1]
        loss = torch.nn.functional.cross_entropy(logits, ids[0, n_prompt:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    options = ["ball", "cube", "cone", "ring"]
    scores = score_options(model, [prompt, prompt], [options, options[::-1]], [image, image], batch_size=3)
    assert options[pick_option(scores[0])] == "cube"
    assert options[::-1][pick_option(scores[1], by="sum")] == "cube"
    assert scores[0][1].num_tokens == 4
    assert abs(scores[0][1].mean_logprob * 4 - scores[0][1].sum_logprob) < 1e-4


def _score_from_scratch(model: TinyVLM, prompt: str, option: str, images: list[Image.Image]) -> float:
    """Reference: prompt + option in one unpadded forward pass, summed log-probability of the option's tokens."""
    p = encode_prompt(model, prompt)
    o = model.tokenizer(option, add_special_tokens=False).input_ids
    ids = torch.tensor([p + o])
    pv = torch.stack([model.image_transform(i) for i in images]) if images else None
    logp = torch.log_softmax(model.language_model(inputs_embeds=model.embed(ids, pv)).logits[0].float(), -1)
    return float(sum(logp[len(p) - 1 + j, t] for j, t in enumerate(o)))


def test_cached_prompt_scoring_equals_scoring_each_option_from_scratch():
    """Prompts of different lengths (left padding), with and without images, options of 1 to several tokens and a varying
    count per prompt: every batch size gives the from-scratch log-likelihoods."""
    model = TinyVLM(seed=2)
    prompts = [
        chat_prompt("<image>\nwhat colour is it?"),
        chat_prompt("hi"),
        chat_prompt("<image> and <image>: which one is larger, the first or the second?"),
    ]
    images = [[_img((255, 0, 0))], [], [_img((0, 0, 255)), _img((0, 255, 0))]]
    options = [[" red", " a dark blue square", " x"], [" yes"], [" the first", " second", " neither of the two", " b"]]
    want = [[_score_from_scratch(model, p, o, i) for o in opts] for p, opts, i in zip(prompts, options, images)]
    for batch_size in (1, 3, 8):
        got = score_options(model, prompts, options, images, batch_size=batch_size)
        assert [len(g) for g in got] == [3, 1, 4]
        for g_row, w_row, opts in zip(got, want, options):
            for g, w, o in zip(g_row, w_row, opts):
                assert abs(g.sum_logprob - w) < 1e-4, (batch_size, o, g.sum_logprob, w)
                assert g.num_tokens == len(model.tokenizer(o, add_special_tokens=False).input_ids)


def test_option_scoring_uses_the_cache_keyword_of_the_installed_transformers(monkeypatch):
    """transformers 5.24 renamed `past_key_values` to `cache` and warns on the old name, once per evaluation process:
    the scorer reads and passes the cache under the name the model's forward takes, so no such warning is raised."""
    import transformers.utils.generic as hf_generic

    said = []
    monkeypatch.setattr(hf_generic.logger, "warning_once", lambda msg, *a, **k: said.append(msg))
    model = TinyVLM(seed=2)
    score_options(model, [chat_prompt("hi")], [[" a dark blue square", " yes"]], [[]])
    assert not [m for m in said if "deprecated" in m]
