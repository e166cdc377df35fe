"""Vocabulary and LSTM text encoder (SPEC section 3)."""
import string

import torch

_PUNCTUATION_TABLE = str.maketrans('', '', string.punctuation)


def tokenize_text(text):
    """Drop non-ASCII, lower-case, delete punctuation, split on white space."""
    text = text.encode('ascii', 'ignore').decode('ascii')
    return text.lower().translate(_PUNCTUATION_TABLE).strip().split()


class SimpleVocab:
    """`<UNK>` = 0, then every distinct token of the training texts, sorted (SPEC 3) or in order
    of first appearance (the 2019 code, with which the released checkpoints were trained)."""

    ORDERS = ('sorted', 'first_seen')

    UNK = '<UNK>'

    def __init__(self, words=()):
        self.word2id = {self.UNK: 0}
        for word in words:
            if word != self.UNK and word not in self.word2id:
                self.word2id[word] = len(self.word2id)

    @classmethod
    def from_texts(cls, texts, order='sorted'):
        if order not in cls.ORDERS:
            raise ValueError(f'vocabulary order {order!r}: expected one of {cls.ORDERS}')
        tokens = {}  # a dict keeps first appearances in order
        for text in texts:
            tokens.update(dict.fromkeys(tokenize_text(text)))
        return cls(sorted(tokens) if order == 'sorted' else list(tokens))

    def words(self):
        """Words in id order, without `<UNK>`: enough to rebuild this vocabulary exactly."""
        return sorted(self.word2id, key=self.word2id.get)[1:]

    def encode_text(self, text):
        """Token ids, unknown words -> 0.  An empty text becomes a single `<UNK>` so that the
        encoder reads a real LSTM output instead of padding (the reference indexed position -1)."""
        ids = [self.word2id.get(token, 0) for token in tokenize_text(text)]
        return ids or [0]

    def get_size(self):
        return len(self.word2id)

    def __len__(self):
        return len(self.word2id)


class TextLSTMModel(torch.nn.Module):

    def __init__(self, texts_to_build_vocab=(), word_embed_dim=512, lstm_hidden_dim=512,
                 vocab=None):
        super().__init__()
        self.vocab = vocab if vocab is not None else SimpleVocab.from_texts(texts_to_build_vocab)
        self.word_embed_dim = word_embed_dim
        self.lstm_hidden_dim = lstm_hidden_dim
        self.embedding_layer = torch.nn.Embedding(self.vocab.get_size(), word_embed_dim)
        self.lstm = torch.nn.LSTM(word_embed_dim, lstm_hidden_dim)
        self.fc_output = torch.nn.Sequential(
            torch.nn.Dropout(p=0.1),
            torch.nn.Linear(lstm_hidden_dim, lstm_hidden_dim),
        )

    def forward(self, texts):
        """texts: list of strings, or list of lists of token ids."""
        if len(texts) and isinstance(texts[0], str):
            texts = [self.vocab.encode_text(text) for text in texts]
        return self.forward_encoded_texts(texts)

    def forward_encoded_texts(self, texts):
        device = self.embedding_layer.weight.device
        lengths = torch.tensor([max(len(t), 1) for t in texts], device=device)
        padded = torch.zeros((int(lengths.max()), len(texts)), dtype=torch.long)
        for i, ids in enumerate(texts):
            padded[:len(ids), i] = torch.as_tensor(ids, dtype=torch.long)
        embedded = self.embedding_layer(padded.to(device, non_blocking=True))
        # The LSTM reads left to right from a zero state, so the output at a text's last token
        # does not depend on the padding after it.
        # CPU autocast (--amp) would send the LSTM to oneDNN's bfloat16 kernel, which processors
        # without native bfloat16 cannot build at all (AVX2: "could not create a primitive
        # descriptor"); the LSTM is a small share of a step, so it stays float32 on every CPU.
        # CUDA's autocast is left as it was.
        with torch.autocast('cpu', enabled=False):
            lstm_output, _ = self.lstm(embedded)
        batch_index = torch.arange(len(texts), device=device)
        text_features = lstm_output[lengths - 1, batch_index]
        return self.fc_output(text_features)
