"""What the code blocks of README.md and docs/ assume a reader already has: a model, its optimizer
and loader, and the training and evaluation helpers they call (tests/test_doc_blocks.py runs each
block after this). Small on purpose: a block runs in a second or two."""

import torch

EPOCHS = 3


def names_for(source: str) -> dict:
    """The names a block may use, made fresh for each block (a block that trains changes them).
    The diffusers UNet is made only for a block that names it (its import is slow)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(144, 3),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(4)]

    def train_step(model, *batch):
        """One SGD step on a batch, given as (x, y) or as x, y."""
        x, y = batch[0] if len(batch) == 1 else batch
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    def train(model, optimizer, loader, epochs=EPOCHS):
        for _ in range(epochs):
            train_one_epoch(model, loader, optimizer)

    def train_one_epoch(model, loader, optimizer):
        model.train()
        for batch in loader:
            train_step(model, batch)

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            return sum(model(x).argmax(1).eq(y).sum().item() for x, y in loader)

    names = {
        "torch": torch,
        "model": model,
        "net": model,
        "optimizer": optimizer,
        "loader": loader,
        "epochs": EPOCHS,
        "swa_start": 1,
        "step": 1,
        "x_test": loader[0][0],
        "train": train,
        "train_step": train_step,
        "train_one_epoch": train_one_epoch,
        "evaluate": evaluate,
    }
    if "unet" in source:
        names.update(_tiny_unet())
    return names


def _tiny_unet() -> dict:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    return {"unet": unet, "UNet2DConditionModel": UNet2DConditionModel}
