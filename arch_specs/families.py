"""The families hubmerge is tested on, each with a tiny timm configuration, and the support level the
family test (``tests/test_families.py``) checks: ``partial`` = partial merges and budgets (every group can
be widened; attention heads merge or stay apart whole), ``some`` = partial merges and budgets that widen some
groups, while others are always merged (an op mixes their units that no partitioned module reproduces:
a channel slice that cuts a group, attention whose output is sized by its input), ``full`` = full merges
(γ=0) with exact invariants; widening these groups needs partitioned versions of the constructs named by
``hubmerge inspect`` (a weight-standardised conv without a gain), which are not built yet."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    """One family: a timm architecture, tiny ``model_args`` and input size for tests, and its support."""

    architecture: str
    model_args: dict = field(default_factory=dict)
    input_size: tuple[int, int, int] = (3, 32, 32)
    support: str = "full"
    # the allocator of the family test's budget merge; "uniform" only where benefit allocation of the tiny
    # model would take minutes of the test run (the budget path under test, build, save and reload, is the same)
    budget_allocator: str = "benefit"


FAMILIES = {
    "mlp": Family("hubmerge_mlp", dict(depth=2, width=12, bn=True, img_size=6), (1, 6, 6), "partial"),
    "cifar_vgg": Family("hubmerge_vgg11", dict(width_multiplier=1 / 32), (3, 32, 32), "partial"),
    "cifar_resnet": Family("hubmerge_resnet20", dict(), (3, 16, 16), "partial"),
    "resnet": Family("resnet18", dict(channels=(4, 8, 8, 12)), support="partial"),
    "resnet-d": Family("resnet26d", dict(channels=(4, 8, 8, 12), stem_width=4), support="partial"),
    "resnext": Family("resnet50", dict(layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), cardinality=4, base_width=16),
                      support="partial"),
    "wide_resnet": Family("wide_resnet50_2", dict(channels=(4, 4, 8, 8)), support="partial"),
    "seresnet": Family("seresnet18", dict(channels=(8, 8, 8, 16)), support="partial"),
    "vgg": Family("vgg11_bn", dict(mlp_ratio=1 / 512), support="partial"),
    "densenet": Family("densenet121", dict(growth_rate=4, block_config=(1, 2, 1, 1), bn_size=2), support="partial"),
    "efficientnet": Family("test_efficientnet", support="partial"),
    "efficientnetv2": Family("tf_efficientnetv2_b0", dict(channel_multiplier=0.25, depth_multiplier=0.25),
                             support="partial"),  # TF "same" padding: timm's Conv2dSame
    "mobilenetv2": Family("mobilenetv2_035", support="partial"),
    "mobilenetv3": Family("mobilenetv3_small_050", support="partial"),
    "mobilenetv4": Family("mobilenetv4_conv_small_035", support="partial"),
    # timm builds RegNets from fixed configurations (2-3M parameters at the smallest): each grouped conv's
    # blocks are groups of their own, so benefit allocation measures hundreds of them (over a minute each on
    # 2 cores); their budget merges are allocated uniformly, and the resnext family's covers tied blocks by benefit
    "regnetx": Family("regnetx_002", support="partial", budget_allocator="uniform"),
    "regnety": Family("regnety_002", support="partial", budget_allocator="uniform"),
    "convnext": Family("test_convnext", support="partial"),
    "convnextv2": Family("convnextv2_atto", dict(depths=(1, 1, 2, 1), dims=(8, 16, 16, 24)), support="partial"),
    "vit": Family("test_vit", input_size=(3, 160, 160), support="partial"),
    "deit": Family("deit_tiny_patch16_224", dict(img_size=32, depth=2, embed_dim=24, num_heads=2), support="partial"),
    "swin": Family("swin_tiny_patch4_window7_224", dict(img_size=56, embed_dim=12, depths=(1, 1), num_heads=(2, 2)),
                   (3, 56, 56), "partial"),
    "beit": Family("beit_base_patch16_224", dict(img_size=32, depth=2, embed_dim=24, num_heads=2), support="partial"),
    "eva02": Family("eva02_tiny_patch14_224", dict(img_size=28, depth=2, embed_dim=24, num_heads=2), (3, 28, 28),
                    "partial"),
    # RexNet adds each shortcut to the first channels of a wider output (x[:, :C] += shortcut): the groups that cut
    # holds keep their width, the others widen
    "rexnet": Family("rexnet_100", dict(width_mult=0.25), support="some"),
    "mobilevit": Family("mobilevit_xxs", input_size=(3, 64, 64), support="partial"),
    "ghostnet": Family("ghostnet_050", support="partial"),
    # timm builds inception_v3 at full width only (38M parameters): benefit allocation over its ~100 groups
    # takes 3 minutes on 2 cores, so its budget merge is allocated uniformly (tests/test_budget covers benefit)
    "inception_v3": Family("inception_v3", input_size=(3, 75, 75), support="partial", budget_allocator="uniform"),
    "mixer": Family("mixer_s32_224", dict(img_size=64, mlp_ratio=(0.05, 0.05)), (3, 64, 64), "partial"),
    "resmlp": Family("resmlp_12_224", dict(img_size=32), support="partial"),
    "poolformer": Family("poolformer_s12", support="partial"),
    "nfnet": Family("test_nfnet", support="partial"),
    # BiT: weight-standardised convs without a gain (timm's StdConv2d), which REPAIR could not scale either
    "resnetv2_bit": Family("resnetv2_50x1_bit", dict(channels=(128, 128, 128, 128), stem_chs=32), (3, 64, 64)),
    # heads of 16 dims, so every stage's attention has two heads or more: a single head's relative position bias
    # table has no dim along heads the trace could see, and its head is kept merged; benefit allocation over its
    # 101 groups takes about a minute on 2 cores (66 s against 7 s uniformly), so its budget merge is uniform
    "maxvit": Family("test_maxvit", dict(transformer_dim_head=16), (3, 160, 160), "partial",
                     budget_allocator="uniform"),
}
