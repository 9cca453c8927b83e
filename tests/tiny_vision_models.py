"""Tiny random-weight BLIP captioning and VQA models with a real BlipProcessor, saved like real ones
(config + safetensors + processor files) and loaded back through ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
WORDS = (
    "a an the of in on with and is are there it this that what how many who where which colour color picture "
    "photo image first second third last people person man woman cat dog cup coffee rocket sky red blue green "
    "white black yellow one two three four yes no sitting standing table space ? . ,"
).split()


def build_tiny_processor(folder: Path, *, image_size: int = 32):  # noqa: ANN201 - a BlipProcessor
    """A BERT WordPiece tokenizer over a small vocabulary, and BLIP's image processor (PIL backend)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast, BlipImageProcessorPil, BlipProcessor

    vocab = {w: i for i, w in enumerate([*SPECIALS, *WORDS])}
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tk.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="[DEC]",
    )
    images = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = BlipProcessor(image_processor=images, tokenizer=tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(folder)
    return processor


def blip_config(
    *,
    vocab_size: int,
    text_hidden: int = 32,
    text_layers: int = 1,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    heads: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
):  # noqa: ANN201 - a BlipConfig
    from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

    text = BlipTextConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        encoder_hidden_size=vision_hidden,
        intermediate_size=text_hidden * 4,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        max_position_embeddings=128,
        bos_token_id=5,
        pad_token_id=0,
        sep_token_id=3,
        eos_token_id=3,
    )
    vision = BlipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 4,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    return BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=vision_hidden)


def build_tiny_blip(folder: Path, *, task: str, seed: int = 0, **dims: int) -> Path:
    """``task`` "caption" (BlipForConditionalGeneration) or "vqa" (BlipForQuestionAnswering).

    Special tokens are made unreachable in the decoder, so every answer is printable words and runs
    to ``max_new_tokens`` (predictable length, never empty)."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipForQuestionAnswering

    image_size = dims.get("image_size", 32)
    build_tiny_processor(folder, image_size=image_size)
    config = blip_config(vocab_size=len(SPECIALS) + len(WORDS), **dims)
    torch.manual_seed(seed)
    cls = BlipForConditionalGeneration if task == "caption" else BlipForQuestionAnswering
    model = cls(config)
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[: len(SPECIALS)] = -1e4
        model.text_decoder.cls.predictions.bias[len(SPECIALS) + WORDS.index("?")] = -1e4
    model.save_pretrained(folder)
    return folder
