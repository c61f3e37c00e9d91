"""AWD-LSTM (Merity, Keskar & Socher 2017, "Regularizing and Optimizing LSTM Language Models", arXiv:1708.02182).

Three ``torch.nn.LSTM`` layers (400 -> 1150 -> 1150 -> 400, the last sized for the tied decoder) with DropConnect on
each hidden-to-hidden matrix and the AWD dropouts of :mod:`models.awd`. Defaults are the 2018 fast.ai WikiText-2
recipe (``../shared/RECIPES.md``).
"""

from __future__ import annotations

from torch import nn

from models.awd import AWDNetwork, add_weight_drop


class AWDLSTM(AWDNetwork):
    """The AWD-LSTM network (embedding, weight-dropped LSTMs, tied decoder).

    Args:
        vocab_size: number of words (given by :class:`~models.language_model.LanguageModel` once the data is known).
        emb_size: embedding width, also the last LSTM's output (paper: 400).
        hidden_size: width of the other LSTM layers (paper: 1150).
        num_layers: LSTM layers (paper: 3).
        dropout_input: locked dropout on the embedding output (2018 recipe: 0.6).
        dropout_hidden: locked dropout between layers (0.2).
        dropout_output: locked dropout on the last output (0.4).
        dropout_embedding: word dropout on the embedding (0.1).
        dropout_weight: DropConnect on every ``weight_hh`` (0.5).

    Example::

        net = AWDLSTM(vocab_size=33278)
        out = net(tokens)            # tokens: (time, batch) ids
        logits = net.decode(out.output)
    """

    def __init__(
        self,
        vocab_size: int,
        emb_size: int = 400,
        hidden_size: int = 1150,
        num_layers: int = 3,
        dropout_input: float = 0.6,
        dropout_hidden: float = 0.2,
        dropout_output: float = 0.4,
        dropout_embedding: float = 0.1,
        dropout_weight: float = 0.5,
    ) -> None:
        if num_layers < 1 or hidden_size < 1:
            raise ValueError(f"AWDLSTM needs num_layers >= 1 and hidden_size >= 1, got {num_layers}, {hidden_size}.")
        if not 0.0 <= dropout_weight < 1.0:
            raise ValueError(f"AWDLSTM dropout_weight must lie in [0, 1), got {dropout_weight}.")
        layers = []
        for i in range(num_layers):
            lstm = nn.LSTM(
                emb_size if i == 0 else hidden_size, emb_size if i == num_layers - 1 else hidden_size, num_layers=1
            )
            add_weight_drop(lstm, "weight_hh_l0", dropout_weight)
            layers.append(lstm)
        super().__init__(
            vocab_size, emb_size, layers, dropout_input, dropout_hidden, dropout_output, dropout_embedding
        )
        self.hidden_size, self.num_layers, self.dropout_weight = hidden_size, num_layers, dropout_weight
