"""``mmadapt compose`` and ``compose()`` on a tiny image run trained once for the module.

A tiny random model writes gibberish, so these tests check the pipeline's structure:
slots, outputs, determinism, no image reuse, recorded scores, and that the likelihood
ranker's choice is the image that maximises the caption log-likelihood computed directly.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import mmadapt
from mmadapt.cli import main
from mmadapt.data.tokenize import IGNORE_INDEX, encode_conversation, encode_prompt
from mmadapt.errors import InputError
from mmadapt.inference import article
from mmadapt.inference.chat import ChatSession
from mmadapt.inference.compose import (
    CAPTION_ASK,
    OutlineLine,
    choose_positions,
    compose,
    even_positions,
    parse_outline,
    parse_positions,
    split_paragraphs,
)
from mmadapt.inference.rank import (
    ClipRanker,
    LikelihoodRanker,
    description_start,
    read_image,
    scored_span,
    unexplained_words,
)
from tests.helpers import REPO, SHAPES, run_train, shapes_subset, tiny_overrides

# An untied output head makes the text depend on the prompt (see tests/test_chat.py).
UNTIED = "model.llm.config.tie_word_embeddings=false"
OUTLINE = "- Red things\n- Blue things [image]\n\n- Green things [image]\n"
CANDIDATES = [f"test-{i:05d}.png" for i in range(5)]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("compose")
    data = shapes_subset(folder / "data", n_train=8, n_test=4)
    out = folder / "run"
    overrides = tiny_overrides(data, out, UNTIED, "train.max_steps=1", "eval.max_new_tokens=2")
    result = run_train(overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def session(run) -> ChatSession:
    return ChatSession.from_run(run)


@pytest.fixture(scope="module")
def candidates(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("candidates")
    for name in CANDIDATES:
        shutil.copy(SHAPES / "images" / name, folder)
    (folder / "notes.txt").write_text("not an image, ignored")
    return folder


def _compose(session: ChatSession, candidates: Path, out: Path, **settings) -> dict:
    settings = {"temperature": 1.0, "max_new_tokens": 12, **settings}
    compose(session.model, "Write about shapes.", candidates, out, system_prompt=session.system_prompt, **settings)
    return json.loads((out / "decisions.json").read_text())


def test_outline_marks_place_the_images_and_every_output_is_written(session, candidates, tmp_path):
    out = tmp_path / "article"
    decisions = _compose(session, candidates, out, num_images=2, outline=OUTLINE)
    paragraphs, slots = decisions["paragraphs"], decisions["slots"]
    assert len(paragraphs) == 3 and decisions["placement"]["method"] == "outline"
    assert [slot["after_paragraph"] for slot in slots] == [2, 3]
    blocks = (out / "article.md").read_text().rstrip("\n").split("\n\n")
    assert [blocks[0], blocks[1], blocks[3]] == paragraphs
    for block, slot in zip((blocks[2], blocks[4]), slots):
        assert block.startswith("![") and block.endswith(f"](images/{slot['image']})")
        assert (out / "images" / slot["image"]).read_bytes() == (candidates / slot["image"]).read_bytes()
    page = (out / "article.html").read_text()
    sources = re.findall(r'<img src="([^"]*)"', page)
    prefix = "data:image/png;base64,"
    assert all(source.startswith(prefix) for source in sources) and len(sources) == 2
    embedded = [base64.b64decode(source[len(prefix) :]) for source in sources]
    assert embedded == [(candidates / slot["image"]).read_bytes() for slot in slots]
    assert page.count("<p>") == 3 and page.count("<figcaption>") == 2
    assert sorted(path.name for path in out.iterdir()) == ["article.html", "article.md", "decisions.json", "images"]


def test_same_seed_same_article_another_seed_another_and_the_callers_rng_untouched(session, candidates, tmp_path):
    rng_state = torch.get_rng_state()
    first = _compose(session, candidates, tmp_path / "a", num_images=1, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)
    again = _compose(session, candidates, tmp_path / "b", num_images=1, seed=3)
    other = _compose(session, candidates, tmp_path / "c", num_images=1, seed=4)
    assert again == first
    for name in ("article.md", "article.html"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert other["paragraphs"] != first["paragraphs"]


def _direct_log_likelihood(
    session: ChatSession, caption: str, image_path: Path, closing_weight: float = 0.1, span: int | None = None
) -> float:
    """The ranker's score through the model's loss, one image at a time: the first ``span``
    tokens of the caption's words (all of them for None; scored as the start of the answer)
    plus ``closing_weight`` x the rest of the whole answer."""
    model = session.model
    encoder = model.encoders["image"]
    question = [{"role": "user", "content": "<image>\nDescribe the picture."}]
    pixels = encoder.preprocess(read_image(image_path))[None]

    def log_likelihood(input_ids: list[int], labels: list[int]) -> float:
        labels = torch.tensor([labels])
        with torch.no_grad():
            loss = model(torch.tensor([input_ids]), images=pixels, labels=labels).loss
        return -float(loss) * int((labels[:, 1:] != IGNORE_INDEX).sum())

    prompt = encode_prompt(model.tokenizer, question, encoder.num_tokens, session.system_prompt)
    words = model.tokenizer(caption.rstrip(".!? "), add_special_tokens=False)["input_ids"][:span]
    start = log_likelihood(prompt + words, [IGNORE_INDEX] * len(prompt) + words) if words else 0.0
    answer = [*question, {"role": "assistant", "content": caption}]
    whole = encode_conversation(model.tokenizer, answer, encoder.num_tokens, session.system_prompt)
    return start + closing_weight * (log_likelihood(whole["input_ids"], whole["labels"]) - start)


def test_likelihood_ranking_picks_the_image_with_the_highest_direct_caption_start_log_likelihood(
    session, candidates, tmp_path
):
    # A tiny random model explains no token (vocabulary 49k), which would end the scored span
    # at once; this test checks a span of all the caption's words, and the tests below the cut.
    ranker = LikelihoodRanker(session.model, session.system_prompt, unexplained_below=0.0)
    decisions = _compose(
        session, candidates, tmp_path / "article", num_images=2, outline=OUTLINE, batch_size=2, ranker=ranker
    )
    used: set[str] = set()
    for slot in decisions["slots"]:
        free = [name for name in CANDIDATES if name not in used]
        direct = {name: _direct_log_likelihood(session, slot["caption"], candidates / name) for name in free}
        assert len({round(value, 3) for value in direct.values()}) > 1  # the images do change the score
        assert slot["scores"].keys() == direct.keys()
        for name in free:
            assert slot["scores"][name] == pytest.approx(direct[name], rel=1e-5, abs=1e-3)
        assert slot["image"] == max(direct, key=direct.get) and slot["score"] == max(slot["scores"].values())
        used.add(slot["image"])


def test_the_tokens_closing_a_caption_count_with_their_weight(session, candidates):
    images = [read_image(candidates / name) for name in CANDIDATES[:3]]
    words_only = LikelihoodRanker(session.model, session.system_prompt, closing_weight=0.0, unexplained_below=0.0)
    assert words_only.scores("A red circle.", images) == pytest.approx(words_only.scores("A red circle", images))
    assert words_only.scores("A red circle.", images) != pytest.approx(words_only.scores("A red", images))
    whole = LikelihoodRanker(session.model, session.system_prompt, closing_weight=1.0, unexplained_below=0.0)
    for image, score in zip(CANDIDATES[:3], whole.scores("A red circle.", images)):
        assert score == pytest.approx(_direct_log_likelihood(session, "A red circle.", candidates / image, 1.0), rel=1e-5)
    with pytest.raises(InputError, match="closing_weight"):
        LikelihoodRanker(session.model, closing_weight=2.0)
    with pytest.raises(InputError, match="unexplained_below"):
        LikelihoodRanker(session.model, unexplained_below=1.0)
    assert description_start("Is it red? ") == "Is it red"
    assert description_start("...") == "..."


def test_the_scored_span_ends_at_the_first_of_the_words_no_image_explains():
    log_probs = torch.log(torch.tensor([[0.9, 0.0005, 0.5, 0.3], [0.8, 0.002, 0.0001, 0.0001]]))
    assert scored_span(log_probs, 4, 1e-3) == 4  # every word is likely under some image
    assert scored_span(log_probs[:1], 4, 1e-3) == 1
    assert scored_span(log_probs[:1], 4, 1e-4) == 4
    assert scored_span(log_probs[:1], 4, 0.0) == 4
    assert scored_span(log_probs[1:], 2, 1e-3) == 2  # the tokens after the words never end it
    assert unexplained_words(log_probs, 4, 1e-3).tolist() == [False, False, False, False]
    assert unexplained_words(log_probs[1:], 4, 1e-3).tolist() == [False, False, True, True]
    assert unexplained_words(log_probs[1:], 4, 0.0).tolist() == [False] * 4


def test_the_ranker_discounts_the_words_past_the_span_and_the_unexplained_and_closing_tokens_past_both(
    session, candidates
):
    names, caption = CANDIDATES[:3], "A red circle."
    words = len(session.model.tokenizer("A red circle", add_special_tokens=False)["input_ids"])
    starts = torch.tensor([
        [_direct_log_likelihood(session, caption, candidates / name, 0.0, span) for span in range(words + 1)]
        for name in names
    ])
    per_token = starts.diff(dim=1)  # (images, words)
    best = per_token.max(dim=0).values
    cut = int(best.argmin())  # with a threshold just above it, the least likely word ends the span
    ranker = LikelihoodRanker(session.model, session.system_prompt, unexplained_below=float(best[cut].exp()) * 1.001)
    assert (best < best[cut] + math.log(1.001)).nonzero().flatten().tolist() == [cut]  # no other word under it
    scores = ranker.scores(caption, [read_image(candidates / name) for name in names], batch_size=2)
    for k, (name, score) in enumerate(zip(names, scores)):
        # the span in full, the unexplained word that ends it x 0.01, the words after it x 0.1,
        # the closing tokens past both x 0.01
        whole = _direct_log_likelihood(session, caption, candidates / name, 1.0)
        past = starts[k, words] - starts[k, cut + 1]
        expected = starts[k, cut] + 0.01 * per_token[k, cut] + 0.1 * past + 0.01 * (whole - starts[k, words])
        assert score == pytest.approx(float(expected), rel=1e-5)


def test_reference_images_join_the_instruction(session, candidates, tmp_path):
    reference = candidates / CANDIDATES[0]
    out = tmp_path / "with"
    settings = {"num_images": 1, "temperature": 0.0, "max_new_tokens": 8, "system_prompt": session.system_prompt}
    assert compose(session.model, "Write about it.", candidates, out, references=[reference], **settings) == out
    compose(session.model, "Write about it.", candidates, tmp_path / "without", **settings)
    with_reference, without = (
        json.loads((tmp_path / name / "decisions.json").read_text()) for name in ("with", "without")
    )
    assert with_reference["references"] == [str(reference)]
    assert with_reference["paragraphs"] != without["paragraphs"]  # greedy text depends on the prompt's image


def test_as_many_images_as_candidates_uses_each_once(session, candidates, tmp_path):
    decisions = _compose(session, candidates, tmp_path / "article", num_images=len(CANDIDATES))
    chosen = [slot["image"] for slot in decisions["slots"]]
    assert sorted(chosen) == CANDIDATES
    for k, slot in enumerate(decisions["slots"]):
        assert set(slot["scores"]) == set(CANDIDATES) - set(chosen[:k])


def test_auto_follows_the_models_answer_or_spreads_the_images_evenly(session, candidates, tmp_path):
    decisions = _compose(session, candidates, tmp_path / "article", num_images="auto", max_new_tokens=48)
    paragraphs, placement = decisions["paragraphs"], decisions["placement"]
    positions = [slot["after_paragraph"] - 1 for slot in decisions["slots"]]
    parsed = parse_positions(placement["answer"], len(paragraphs))
    if placement["method"] == "model":
        assert positions == sorted(parsed[: len(CANDIDATES)])
    else:
        assert placement["method"] == "even" and not parsed
        assert positions == even_positions(len(paragraphs), min(len(CANDIDATES), -(-len(paragraphs) // 2)))


@pytest.mark.parametrize(
    "answer, wanted, expected, method",
    [
        ("Paragraphs 4 and 2, then 4 again and 9.", None, [1, 3], "model"),
        ("4, 2", 2, [1, 3], "model"),
        ("Only 3.", 2, [1, 3], "even"),  # one number where two were asked for
        ("None of them.", None, [1, 3], "even"),  # ceil(5 / 2) = 3 images, capped at 2 candidates
        ("1, 2, 3, 4, 5", None, [0, 1], "model"),  # capped at 2 candidates
    ],
)
def test_slot_choice_parses_the_answer_and_falls_back_to_the_even_rule(answer, wanted, expected, method):
    positions, placement = choose_positions(["p"] * 5, [], wanted, 2, ask=lambda paragraphs, wanted: answer)
    assert positions == expected and placement == {"method": method, "answer": answer}


def test_even_positions_spread_images_and_repeat_only_when_they_outnumber_paragraphs():
    assert even_positions(5, 2) == [1, 3]
    assert even_positions(3, 3) == [0, 1, 2]
    assert even_positions(2, 3) == [0, 1, 1]


def test_paragraphs_are_cut_at_the_sentence_end_nearest_the_middle_of_the_longest():
    text = "One is red. Two is blue! Three is green? Four is pink."
    assert split_paragraphs([text], 2) == ["One is red. Two is blue!", "Three is green? Four is pink."]
    # the longest paragraph is cut first
    assert split_paragraphs(["A b. C d.", text], 3) == ["A b. C d.", "One is red. Two is blue!", "Three is green? Four is pink."]
    assert split_paragraphs(["A. B.", "No sentence end. "], 5) == ["A.", "B.", "No sentence end. "]
    assert split_paragraphs([text], 1) == [text]
    assert split_paragraphs(['She said "Hi!" Then she left.'], 2) == ['She said "Hi!"', "Then she left."]


def test_images_outnumbering_the_answers_paragraphs_follow_its_sentences(session, candidates, tmp_path, monkeypatch):
    answer = "A red circle here. It is round. A blue square there. It has corners."
    monkeypatch.setattr("mmadapt.inference.compose._Writer.article", lambda *args: [answer])
    decisions = _compose(session, candidates, tmp_path / "article", num_images=2)
    assert decisions["paragraphs"] == ["A red circle here. It is round.", "A blue square there. It has corners."]
    assert [slot["after_paragraph"] for slot in decisions["slots"]] == [1, 2]


def test_captions_see_the_outline_topic_and_keep_their_first_sentence(session, candidates, tmp_path, monkeypatch):
    requests = []

    def answers(writer, conversations, max_new_tokens, **sampling):
        asks = [conversation for conversation in conversations if CAPTION_ASK in conversation[-1]["content"]]
        requests.extend(asks)
        return ['"A blue circle." It is round.' if conversation in asks else "1, 2" for conversation in conversations]

    monkeypatch.setattr("mmadapt.inference.compose._Writer._answers", answers)
    outlined = _compose(session, candidates, tmp_path / "outlined", outline=OUTLINE)
    monkeypatch.setattr("mmadapt.inference.compose._Writer.article", lambda *args: ["Red here.", "Blue there."])
    plain = _compose(session, candidates, tmp_path / "plain", num_images=2)
    assert [slot["caption"] for slot in outlined["slots"] + plain["slots"]] == ["A blue circle."] * 4
    topics = [re.match("Topic: (.*)\nParagraph: ", request[-1]["content"]) for request in requests]
    assert [topic and topic[1] for topic in topics] == ["Blue things", "Green things", None, None]
    # the worked examples take the request's form
    topic_turns = [sum(turn["content"].startswith("Topic: ") for turn in request) for request in requests]
    assert topic_turns == [3, 3, 0, 0]


def test_outline_lines_drop_bullets_and_keep_image_marks():
    assert parse_outline("1. Intro\n\n* Body [IMAGE]\n- End [image]") == [
        OutlineLine("Intro", False), OutlineLine("Body", True), OutlineLine("End", True),
    ]
    with pytest.raises(InputError, match="no topics"):
        parse_outline(["", "  "])
    with pytest.raises(InputError, match="needs a topic"):
        parse_outline(["- [image]"])


def test_command_streams_the_article_and_writes_the_outputs(run, candidates, tmp_path, capsys):
    outline = tmp_path / "outline.txt"
    outline.write_text(OUTLINE)
    out = tmp_path / "article"
    args = [
        "compose", "--checkpoint", str(run), "--instruction", "Write about shapes.", "--images", str(candidates),
        "--out", str(out), "--outline", str(outline), "--max-new-tokens", "8", "--temperature", "1", "--seed", "5",
        "--closing-weight", "0.2", "--unexplained-below", "0",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    decisions = json.loads((out / "decisions.json").read_text())
    assert captured.out.split() == " ".join(decisions["paragraphs"]).split()
    assert "ranking images" in captured.err and "article.html" in captured.err
    assert decisions["num_images"] == "auto" and len(decisions["slots"]) == 2 and decisions["seed"] == 5
    assert decisions["ranker"]["closing_weight"] == 0.2 and decisions["ranker"]["unexplained_below"] == 0


def _folder_with(tmp: Path, *files: tuple[str, bytes]) -> Path:
    folder = tmp / "pictures"
    folder.mkdir()
    for name, data in files:
        (folder / name).write_bytes(data)
    return folder


def _outline_file(tmp: Path) -> Path:
    (tmp / "outline.txt").write_text(OUTLINE)
    return tmp / "outline.txt"


def _incomplete_run(run: Path, tmp: Path) -> Path:
    (tmp / "half").mkdir()
    shutil.copy(run / "config.yaml", tmp / "half")
    return tmp / "half"


def _run_of_another_base(run: Path, tmp: Path) -> Path:
    shutil.copytree(run, tmp / "other", ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    meta_path = tmp / "other" / "adapter" / "adapter_config.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "base_fingerprint": "0" * 16}))
    return tmp / "other"


@pytest.mark.parametrize(
    "make_args, named",
    [
        (lambda run, c, tmp: ["--reference", str(tmp / "none.png")], "none.png"),
        (lambda run, c, tmp: ["--images", str(_folder_with(tmp, ("broken.png", b"not a png")))], "broken.png"),
        (lambda run, c, tmp: ["--images", str(_folder_with(tmp, ("a.txt", b"text")))], "holds no images"),
        (lambda run, c, tmp: ["--images", str(tmp / "nowhere")], "nowhere: no such folder"),
        (lambda run, c, tmp: ["--num-images", "9"], "9 images asked for but"),
        (lambda run, c, tmp: ["--num-images", "two"], "'two'"),
        (lambda run, c, tmp: ["--num-images", "3", "--outline", str(_outline_file(tmp))], "marks 2 paragraphs"),
        (lambda run, c, tmp: ["--outline", str(tmp / "none.txt")], "--outline"),
        (lambda run, c, tmp: ["--checkpoint", str(_incomplete_run(run, tmp))], "half"),
        (lambda run, c, tmp: ["--checkpoint", str(_run_of_another_base(run, tmp))], "other"),
        (lambda run, c, tmp: ["--clip", "ViT-B-32"], "--clip-weights"),
        (lambda run, c, tmp: ["--clip", "ViT-B-32", "--clip-weights", str(tmp / "w.pt")], "w.pt: no such file"),
        (lambda run, c, tmp: ["--clip", "no-such-clip", "--clip-weights", str(tmp)], "no-such-clip"),
        (lambda run, c, tmp: ["--max-new-tokens", "0"], "max_new_tokens"),
        (lambda run, c, tmp: ["--closing-weight", "2"], "closing_weight must be in"),
        (lambda run, c, tmp: ["--clip", "ViT-B-32", "--clip-weights", str(tmp), "--unexplained-below", "0"], "--clip"),
        (lambda run, c, tmp: ["--instruction", " "], "instruction is empty"),
    ],
    ids=[
        "missing-reference", "unreadable-candidate", "empty-folder", "missing-folder", "too-many-images",
        "bad-count", "outline-mismatch", "missing-outline", "incomplete-run", "other-base", "clip-no-weights",
        "clip-missing-weights", "clip-unknown-model", "no-tokens", "bad-closing-weight", "ranker-flag-with-clip",
        "empty-instruction",
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(run, candidates, tmp_path, capsys, make_args, named):
    out = tmp_path / "article"
    base = {"--checkpoint": str(run), "--instruction": "Write.", "--images": str(candidates), "--out": str(out)}
    extra = make_args(run, candidates, tmp_path)
    for key in [key for key in base if key in extra]:
        del base[key]
    args = [item for pair in base.items() for item in pair]
    assert main(["compose", *args, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and named in captured.err
    assert not out.exists()


def test_a_model_without_an_image_encoder_cannot_rank(candidates, tmp_path):
    cfg = mmadapt.load_config(REPO / "configs" / "blsp_kd.yaml", ["model=models/tiny.yaml", "model.vision=null"])
    model = mmadapt.build_model(cfg).eval()
    with pytest.raises(InputError, match="no image encoder"):
        compose(model, "Write.", candidates, tmp_path / "article", num_images=1)
    assert not (tmp_path / "article").exists()


def test_a_failed_write_keeps_the_previous_page_whole(session, candidates, tmp_path, monkeypatch):
    out = tmp_path / "article"
    _compose(session, candidates, out, num_images=1, seed=1)
    previous = (out / "article.html").read_bytes()
    replace = article.os.replace

    def crash_on_html(source, target):
        if Path(target).name == "article.html":
            raise OSError("disk full")
        replace(source, target)

    monkeypatch.setattr(article.os, "replace", crash_on_html)
    with pytest.raises(OSError, match="disk full"):
        _compose(session, candidates, out, num_images=1, seed=2)
    assert (out / "article.html").read_bytes() == previous
    assert not [path.name for path in out.iterdir() if path.name.startswith(".")]


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    """Random weights of a tiny open_clip architecture registered as ``mmadapt-test-clip``
    (and a wider one, ``mmadapt-test-clip-wide``, they do not fit)."""
    folder = tmp_path_factory.mktemp("clip")
    (folder / "mmadapt-test-clip.json").write_text(json.dumps(TINY_CLIP))
    (folder / "mmadapt-test-clip-wide.json").write_text(json.dumps({**TINY_CLIP, "embed_dim": 24}))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    save_file(open_clip.create_model("mmadapt-test-clip").state_dict(), folder / "clip.safetensors")
    return folder / "clip.safetensors"


def test_clip_ranker_picks_the_highest_cosine_similarity(session, candidates, clip_weights, tmp_path):
    ranker = ClipRanker("mmadapt-test-clip", clip_weights)
    decisions = _compose(session, candidates, tmp_path / "article", num_images=1, ranker=ranker)
    slot = decisions["slots"][0]
    clip, _, preprocess = open_clip.create_model_and_transforms("mmadapt-test-clip", pretrained=str(clip_weights))
    pixels = torch.stack([preprocess(read_image(candidates / name)) for name in CANDIDATES])
    text = open_clip.get_tokenizer("mmadapt-test-clip")([slot["caption"]])
    with torch.no_grad():
        image_features, text_features, _ = clip.eval()(pixels, text)  # both L2-normalised
    cosine = dict(zip(CANDIDATES, (image_features @ text_features.T)[:, 0].tolist()))
    assert slot["scores"] == pytest.approx(cosine, abs=1e-5)
    assert slot["image"] == max(cosine, key=cosine.get)
    assert decisions["ranker"] == {"type": "open_clip", "model": "mmadapt-test-clip", "weights": str(clip_weights)}


def test_clip_weights_of_another_architecture_are_refused(clip_weights):
    with pytest.raises(InputError, match="do not load into open_clip mmadapt-test-clip-wide"):
        ClipRanker("mmadapt-test-clip-wide", clip_weights)
