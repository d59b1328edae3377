"""Character-level tokenizer for the offline tiny model.

Built locally with the ``tokenizers`` library (no hub access needed) and wrapped as a transformers
fast tokenizer, so ``AutoTokenizer.from_pretrained(dir)`` reloads it like any other model's.
One character is one token: arithmetic stays trivially tokenizable, and multi-character markers such
as ``</think>`` or ``\\boxed{`` are simply several tokens.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK]
# Digits, arithmetic, space/newline, letters and the punctuation needed by reasoning/answer markers
# (``</think>``, ``<answer>``, ``\\boxed{}``). Appending characters changes every id after them, so
# the tiny-model cache key includes this string.
CHARACTERS = (
    string.digits
    + "+-*/=()"
    + " \n"
    + string.ascii_lowercase
    + string.ascii_uppercase
    + "<>\\{}_^.,:;!?'\"[]|%$#&"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A left-padding character-level tokenizer that prepends ``<bos>`` to every encoded text.

    Why these choices:
    - ``Split`` on every character with ``Fuse`` as decoder: ``decode`` joins characters back without
      inserting spaces, so ``decode(encode(text), skip_special_tokens=True) == text`` for any text
      made of known characters.
    - The ``<bos>`` prefix lives in the backend post-processor (saved in ``tokenizer.json``), so TRL's
      plain-text path (``tokenizer(text=prompts)``), ``SFTTrainer`` and our own evaluation all see the
      same ``<bos>`` + prompt ids; it gives left-padded batches a fixed first real token.
    - Left padding: generation appends to the right end of the prompt, as TRL expects.
    - The special tokens are added as special tokens, so a literal ``"<eos>"`` appended to a text by
      ``SFTTrainer`` encodes as the single EOS id rather than five characters.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per char
    backend.decoder = decoders.Fuse()  # concatenate tokens, no separator
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=BOS,
        unk_token=UNK,
        padding_side="left",
    )
