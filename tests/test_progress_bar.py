"""Training progress where nobody watches a terminal: a TQDM bar on logs and pipes, Lightning's default on a TTY."""

import io

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from trainers.configs import progress_bar_callbacks


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_choice():
    assert progress_bar_callbacks(False, stream=io.StringIO()) == []
    assert progress_bar_callbacks(True, stream=_Terminal()) == []
    bars = progress_bar_callbacks(True, stream=io.StringIO())
    assert len(bars) == 1 and isinstance(bars[0], TQDMProgressBar)


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_log_file_gets_step_progress(capsys, tmp_path):
    """Under pytest's capture stdout is no terminal, as under nohup: the bar's steps reach it during the epoch."""
    data = torch.utils.data.TensorDataset(torch.randn(12, 4), torch.randn(12, 1))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        accelerator="cpu", default_root_dir=tmp_path, callbacks=progress_bar_callbacks(True))
    trainer.fit(_Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Epoch 0" in text
    assert "1/3" in text and "2/3" in text and "3/3" in text  # each step written, not only the epoch's end
