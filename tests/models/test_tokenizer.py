import csv

from hgdpo.models.tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer


def test_known_sd15_ids():
    tok = clip_tokenizer()
    assert len(tok) == CLIP_VOCAB_SIZE
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70  # SD1.5 pads with EOS


def test_matches_open_clip_on_parti_prompts(parti_prompts):
    import open_clip

    with open(parti_prompts, newline="", encoding="utf-8") as f:
        texts = [row["Prompt"] for row in csv.DictReader(f, delimiter="\t")][::5][:200]
    # open_clip also runs ftfy over the text (a curly apostrophe becomes a straight one); SD1.5's
    # tokenizer in diffusers/transformers does not, so compare on plain-ASCII prompts.
    texts = [t for t in texts if t.isascii()]
    assert len(texts) > 150
    reference = open_clip.get_tokenizer("ViT-B-32")(texts)  # (n, 77), zero padded
    ours = clip_tokenizer()(texts, truncation=True, max_length=77).input_ids
    for text, ref, ids in zip(texts, reference.tolist(), ours):
        ref = [t for t in ref if t != 0]
        if len(ref) == 77:  # open_clip puts EOS last when it truncates; transformers does the same
            assert ids[-1] == 49407
        assert ids == ref, text


def test_round_trip_through_saved_folder(tmp_path):
    from transformers import CLIPTokenizer

    clip_tokenizer().save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "A Portrait of an old man, 35mm photo; dramatic light!"
    assert loaded(text).input_ids == clip_tokenizer()(text).input_ids
