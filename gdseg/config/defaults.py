"""Every configuration key of gdseg: its default, its type and its meaning.

Names follow detectron2 / Mask2Former / the published Guided Distillation code, so the
published YAML files and command lines (``SSL.PERCENTAGE 5 SSL.TRAIN_SSL True ...``) work.
Defaults are the published COCO R50 values (SPEC §3-4) unless a comment says otherwise.
"""

from __future__ import annotations

from .config import CfgNode as CN
from .config import Key

_C = CN()
_C.VERSION = Key(2, "Config format version (detectron2 compatibility).")
_C.OUTPUT_DIR = Key("./output", "Folder for checkpoints, metrics, evaluation results and logs.")
_C.SEED = Key(-1, "Global random seed; negative means a time-based seed (recorded in the run).")
_C.CUDNN_BENCHMARK = Key(False, "Enable cudnn.benchmark (faster for fixed input sizes).")
_C.KEEP_FREED_MEMORY = Key(
    True,
    "Keep freed CPU memory in the process (glibc malloc: fixed 32 MiB mmap threshold, no heap "
    "trimming) so each iteration reuses it instead of page-faulting it in again; the resident "
    "set then stays at its peak. Skipped when MALLOC_* variables are set or jemalloc/tcmalloc is "
    "preloaded (gdseg.engine.host_memory).",
)

# ---------------------------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.DEVICE = Key("auto", "Device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda'.")
_C.MODEL.META_ARCHITECTURE = Key("MaskFormer", "Meta architecture; only MaskFormer (Mask2Former).")
_C.MODEL.WEIGHTS = Key(
    "",
    "Initial weights: a local file in torchvision, timm, detectron2 .pkl or gdseg format. For "
    "the student of stage 2 these are the backbone's pretrained weights.",
)
_C.MODEL.PIXEL_MEAN = Key((123.675, 116.28, 103.53), "Per-channel mean of RGB 0-255 inputs.")
_C.MODEL.PIXEL_STD = Key((58.395, 57.12, 57.375), "Per-channel std of RGB 0-255 inputs.")

_C.MODEL.BACKBONE = CN()
_C.MODEL.BACKBONE.NAME = Key(
    "resnet50",
    "Backbone: resnet18/34/50/101, swin_tiny/small/base/large(_384), deit_base, vit_base, "
    "vit_large, dinov2_base, dinov2_large, mobilenet_v2. Detectron2 names (build_resnet_backbone, "
    "D2SwinTransformer) are accepted as aliases.",
)
_C.MODEL.BACKBONE.FREEZE_AT = Key(0, "Freeze the stem and the first N-1 stages (0 = train all).")

_C.MODEL.RESNETS = CN()
_C.MODEL.RESNETS.DEPTH = Key(50, "ResNet depth (18, 34, 50, 101) when NAME is a generic resnet.")
_C.MODEL.RESNETS.NORM = Key("FrozenBN", "Norm layer: FrozenBN, BN or SyncBN.")
_C.MODEL.RESNETS.OUT_FEATURES = Key(("res2", "res3", "res4", "res5"), "Stages returned.")
_C.MODEL.RESNETS.STEM_TYPE = Key("basic", "Stem type (only 'basic'; kept for compatibility).")
_C.MODEL.RESNETS.STEM_OUT_CHANNELS = Key(64, "Stem channels; kept for compatibility, must be 64.")
_C.MODEL.RESNETS.STRIDE_IN_1X1 = Key(False, "Stride in the 1x1 conv (MSRA) or 3x3 (torchvision).")
_C.MODEL.RESNETS.RES5_MULTI_GRID = Key((1, 1, 1), "Kept for compatibility; must be (1, 1, 1).")

_C.MODEL.SWIN = CN()
_C.MODEL.SWIN.PRETRAIN_IMG_SIZE = Key(224, "Image size of the pretraining (224 or 384).")
_C.MODEL.SWIN.PATCH_SIZE = Key(4, "Patch size of the Swin stem.")
_C.MODEL.SWIN.EMBED_DIM = Key(96, "Channels of the first stage.")
_C.MODEL.SWIN.DEPTHS = Key((2, 2, 6, 2), "Blocks per stage.")
_C.MODEL.SWIN.NUM_HEADS = Key((3, 6, 12, 24), "Attention heads per stage.")
_C.MODEL.SWIN.WINDOW_SIZE = Key(7, "Attention window (7 for 224 pretraining, 12 for 384).")
_C.MODEL.SWIN.MLP_RATIO = Key(4.0, "MLP hidden ratio.")
_C.MODEL.SWIN.QKV_BIAS = Key(True, "Bias in the qkv projection.")
_C.MODEL.SWIN.QK_SCALE = Key(None, "Override of the attention scale (None = head_dim**-0.5).")
_C.MODEL.SWIN.DROP_RATE = Key(0.0, "Dropout rate.")
_C.MODEL.SWIN.ATTN_DROP_RATE = Key(0.0, "Attention dropout rate.")
_C.MODEL.SWIN.DROP_PATH_RATE = Key(0.3, "Stochastic depth rate.")
_C.MODEL.SWIN.APE = Key(False, "Absolute position embedding.")
_C.MODEL.SWIN.PATCH_NORM = Key(True, "LayerNorm after patch embedding.")
_C.MODEL.SWIN.OUT_FEATURES = Key(("res2", "res3", "res4", "res5"), "Stages returned.")
_C.MODEL.SWIN.USE_CHECKPOINT = Key(False, "Gradient checkpointing in Swin blocks.")

_C.MODEL.VIT = CN()
_C.MODEL.VIT.TIMM_NAME = Key("", "timm model name overriding the one implied by BACKBONE.NAME.")
_C.MODEL.VIT.IMG_SIZE = Key(
    0,
    "Size of the stored position-embedding grid in pixels (0 = the timm model's pretraining "
    "size: 224 ViT, 384 DeiT, 518 DINOv2); any input size works (interpolated at run time).",
)
_C.MODEL.VIT.DROP_PATH_RATE = Key(0.0, "Stochastic depth rate (published ViT backbones: 0).")
_C.MODEL.VIT.OUT_CHANNELS = Key((128, 256, 512, 1024), "Channels of the strides 4/8/16/32 maps.")
_C.MODEL.VIT.FREEZE = Key(False, "Freeze the ViT trunk (the adapter stays trainable).")

_C.MODEL.SEM_SEG_HEAD = CN()
_C.MODEL.SEM_SEG_HEAD.NAME = Key("MaskFormerHead", "Head name (compatibility; MaskFormerHead).")
_C.MODEL.SEM_SEG_HEAD.NUM_CLASSES = Key(80, "Number of thing classes K (no-object excluded).")
_C.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = Key(255, "Kept for compatibility (semantic segmentation).")
_C.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT = Key(1.0, "Kept for compatibility.")
_C.MODEL.SEM_SEG_HEAD.CONVS_DIM = Key(256, "Channels of the pixel decoder.")
_C.MODEL.SEM_SEG_HEAD.MASK_DIM = Key(256, "Channels of the per-pixel mask features.")
_C.MODEL.SEM_SEG_HEAD.NORM = Key("GN", "Norm of the pixel decoder convs (GN = GroupNorm(32)).")
_C.MODEL.SEM_SEG_HEAD.IN_FEATURES = Key(("res2", "res3", "res4", "res5"), "Backbone features used.")
_C.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = Key(
    "MSDeformAttnPixelDecoder", "Pixel decoder (only MSDeformAttnPixelDecoder)."
)
_C.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = Key(
    ("res3", "res4", "res5"), "Features refined by the deformable-attention encoder."
)
_C.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = Key(4, "Sampling points per head.")
_C.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = Key(8, "Deformable-attention heads.")
_C.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD = Key(
    1024, "FFN width of the deformable encoder."
)
_C.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = Key(4, "Stride of the mask features.")
_C.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = Key(6, "Deformable-attention encoder layers.")
_C.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_AMP = Key(
    False,
    "Let mixed precision (autocast) run the pixel decoder in low precision; False keeps it in "
    "fp32 under autocast, as the published model does.",
)

_C.MODEL.MASK_FORMER = CN()
_C.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = Key(
    "MultiScaleMaskedTransformerDecoder", "Decoder (only the masked-attention decoder)."
)
_C.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = Key("multi_scale_pixel_decoder", "Compatibility.")
_C.MODEL.MASK_FORMER.DEEP_SUPERVISION = Key(True, "Loss on every decoder layer's prediction.")
_C.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = Key(0.1, "Cross-entropy weight of the no-object class.")
_C.MODEL.MASK_FORMER.CLASS_WEIGHT = Key(2.0, "Weight of the classification loss and cost.")
_C.MODEL.MASK_FORMER.DICE_WEIGHT = Key(5.0, "Weight of the dice loss and cost.")
_C.MODEL.MASK_FORMER.MASK_WEIGHT = Key(5.0, "Weight of the sigmoid BCE mask loss and cost.")
_C.MODEL.MASK_FORMER.NHEADS = Key(8, "Attention heads of the transformer decoder.")
_C.MODEL.MASK_FORMER.DROPOUT = Key(0.0, "Dropout of the transformer decoder.")
_C.MODEL.MASK_FORMER.DIM_FEEDFORWARD = Key(2048, "FFN width of the transformer decoder.")
_C.MODEL.MASK_FORMER.ENC_LAYERS = Key(0, "Compatibility (must be 0).")
_C.MODEL.MASK_FORMER.DEC_LAYERS = Key(10, "Predictions: decoder layers + 1 (10 = 9 layers).")
_C.MODEL.MASK_FORMER.PRE_NORM = Key(False, "Pre-norm transformer layers (published: post-norm).")
_C.MODEL.MASK_FORMER.HIDDEN_DIM = Key(256, "Width of the transformer decoder.")
_C.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = Key(100, "Number of queries Q.")
_C.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = Key(
    False, "Always project decoder inputs with 1x1 convs."
)
_C.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = Key(32, "Pad input images to a multiple of this.")
_C.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = Key(112 * 112, "Points sampled per mask for costs/losses.")
_C.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = Key(3.0, "Oversampling of importance sampling.")
_C.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = Key(0.75, "Share of points chosen by uncertainty.")
_C.MODEL.MASK_FORMER.TEST = CN()
_C.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = Key(False, "Compatibility (only instances are supported).")
_C.MODEL.MASK_FORMER.TEST.INSTANCE_ON = Key(True, "Instance inference.")
_C.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = Key(False, "Compatibility (only instances are supported).")
_C.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = Key(0.8, "Compatibility (panoptic).")
_C.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = Key(0.8, "Compatibility (panoptic).")
_C.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = Key(False, "Compatibility.")

# ---------------------------------------------------------------------------------------------
_C.SSL = CN()
_C.SSL.TRAIN_SSL = Key(False, "False: supervised (teacher) training; True: guided distillation.")
_C.SSL.TEACHER_CKPT = Key(
    "", "Teacher weights for stage 2: a stage-1/stage-2 checkpoint or an imported weight file."
)
_C.SSL.BURNIN_ITER = Key(50000, "Iteration at which the teacher becomes the student, then EMA.")
_C.SSL.PERCENTAGE = Key(
    100.0, "Labeled fraction in percent (0.4, 1, 5, ...); the published code 250 means 0.4 %."
)
_C.SSL.SPLIT_SEED = Key(0, "Seed of the labeled-fraction split files to use.")
_C.SSL.FREQ = Key(1, "Use an unlabeled batch every FREQ iterations.")
_C.SSL.EMA_DECAY = Key(0.9996, "EMA decay of the teacher after the burn-in.")
_C.SSL.CKPT_TARGET = Key("TEACHER", "Compatibility with the published code (unused).")
_C.SSL.EVAL_WHO = Key("STUDENT", "Model(s) evaluated in stage 2: STUDENT, TEACHER or BOTH.")
_C.SSL.WEIGHTS = Key("", "Compatibility with the published code (unused).")
_C.SSL.CLASS_THRESHOLD = Key(0.7, "Pseudo-labels: keep queries with max class probability above.")
_C.SSL.MASK_THRESHOLD = Key(0.5, "Pseudo-labels: binarize sigmoid mask probabilities above.")
_C.SSL.MIN_MASK_AREA = Key(5.0, "Pseudo-labels: drop masks whose summed probability is <= this.")
_C.SSL.UNSUP_LOSS_WEIGHT = Key(2.0, "Weight of every unlabeled-branch loss term.")
_C.SSL.IMS_PER_BATCH_UNLABELED = Key(-1, "Global unlabeled batch; -1 = SOLVER.IMS_PER_BATCH.")

# ---------------------------------------------------------------------------------------------
_C.INPUT = CN()
_C.INPUT.FORMAT = Key("RGB", "Channel order of model inputs (RGB).")
_C.INPUT.DATASET_MAPPER_NAME = Key(
    "coco_instance_lsj", "Training augmentation: coco_instance_lsj or mask_former_instance."
)
_C.INPUT.IMAGE_SIZE = Key(1024, "Large-scale-jitter target size and fixed crop size.")
_C.INPUT.MIN_SCALE = Key(0.1, "Large-scale-jitter minimum scale.")
_C.INPUT.MAX_SCALE = Key(2.0, "Large-scale-jitter maximum scale.")
_C.INPUT.RANDOM_FLIP = Key("horizontal", "Random flip: horizontal, vertical or none.")
_C.INPUT.MIN_SIZE_TRAIN = Key((800,), "Shorter-side choices (mask_former_instance mapper).")
_C.INPUT.MIN_SIZE_TRAIN_SAMPLING = Key("choice", "How MIN_SIZE_TRAIN is sampled: choice or range.")
_C.INPUT.MAX_SIZE_TRAIN = Key(1333, "Longer-side cap at training.")
_C.INPUT.MIN_SIZE_TEST = Key(800, "Shorter side at test time (0 = keep the image size).")
_C.INPUT.MAX_SIZE_TEST = Key(1333, "Longer-side cap at test time.")
_C.INPUT.COLOR_AUG_SSD = Key(False, "SSD-style photometric augmentation (Cityscapes).")
_C.INPUT.SIZE_DIVISIBILITY = Key(-1, "Fixed-size padding at training (-1 = none).")
_C.INPUT.CROP = CN()
_C.INPUT.CROP.ENABLED = Key(False, "Random crop (mask_former_instance mapper).")
_C.INPUT.CROP.TYPE = Key("absolute", "Crop type (absolute).")
_C.INPUT.CROP.SIZE = Key((512, 1024), "Crop height, width.")
_C.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = Key(1.0, "Compatibility (semantic segmentation).")

# ---------------------------------------------------------------------------------------------
_C.DATASETS = CN()
_C.DATASETS.TRAIN = Key(("coco_2017_train",), "Labeled training datasets (registered names).")
_C.DATASETS.TEST = Key(("coco_2017_val",), "Evaluation datasets (registered names).")
_C.DATASETS.UNLABELED = Key(
    (), "Unlabeled datasets (names); empty = the training images (the published default)."
)
_C.DATASETS.ROOT = Key(
    "", "Dataset root; empty = $GDSEG_DATASETS, $DETECTRON2_DATASETS, ./datasets."
)
_C.DATASETS.TRAIN_JSON = Key("", "Your own labeled COCO json (overrides DATASETS.TRAIN).")
_C.DATASETS.TRAIN_IMAGE_ROOT = Key("", "Image folder of DATASETS.TRAIN_JSON.")
_C.DATASETS.UNLABELED_IMAGE_ROOT = Key("", "Your own unlabeled images: a folder (recursive).")
_C.DATASETS.UNLABELED_JSON = Key("", "Your own unlabeled images: a COCO json (images only).")
_C.DATASETS.TEST_JSON = Key("", "Your own validation COCO json (overrides DATASETS.TEST).")
_C.DATASETS.TEST_IMAGE_ROOT = Key("", "Image folder of DATASETS.TEST_JSON.")
_C.DATASETS.SYNTHETIC = CN()
_C.DATASETS.SYNTHETIC.NUM_TRAIN = Key(400, "Images in synthetic_train.")
_C.DATASETS.SYNTHETIC.NUM_VAL = Key(100, "Images in synthetic_val.")
_C.DATASETS.SYNTHETIC.IMAGE_SIZE = Key(128, "Side of the synthetic images.")
_C.DATASETS.SYNTHETIC.SEED = Key(0, "Seed of the synthetic dataset.")
_C.DATASETS.SYNTHETIC.NUM_CLASSES = Key(5, "Shape classes (1-6; set MODEL...NUM_CLASSES to it).")
_C.DATASETS.SYNTHETIC.MAX_INSTANCES = Key(6, "Most shapes drawn per synthetic image.")
_C.DATASETS.SYNTHETIC.STYLE = Key(
    "textured", "Synthetic look: 'textured' (hard) or 'plain' (flat shapes, fast to learn)."
)
_C.DATASETS.SYNTHETIC.OBJECT_SIZE = Key(
    (0.08, 0.22), "(min, max) shape radius as a fraction of the synthetic image side."
)
_C.DATASETS.SYNTHETIC.CACHE_DIR = Key("", "Cache folder; empty = ~/.cache/gdseg/synthetic.")

# ---------------------------------------------------------------------------------------------
_C.DATALOADER = CN()
_C.DATALOADER.NUM_WORKERS = Key(4, "Data-loading worker processes per training process.")
_C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = Key(True, "Drop labeled images without annotations.")
_C.DATALOADER.SAMPLER_TRAIN = Key(
    "TrainingSampler", "Labeled sampler: TrainingSampler or RepeatFactorTrainingSampler."
)
_C.DATALOADER.REPEAT_THRESHOLD = Key(
    10.0, "Category-frequency threshold of repeat-factor sampling."
)
_C.DATALOADER.ASPECT_RATIO_GROUPING = Key(False, "Compatibility (batches are padded).")
_C.DATALOADER.SKIP_BAD_RECORDS = Key(False, "Skip (and count) bad images/annotations, not fail.")

# ---------------------------------------------------------------------------------------------
_C.SOLVER = CN()
_C.SOLVER.OPTIMIZER = Key("ADAMW", "Optimizer: ADAMW or SGD.")
_C.SOLVER.IMS_PER_BATCH = Key(16, "Global labeled batch size (all processes together).")
_C.SOLVER.BASE_LR = Key(1e-4, "Base learning rate.")
_C.SOLVER.MOMENTUM = Key(0.9, "SGD momentum.")
_C.SOLVER.BETAS = Key((0.9, 0.999), "AdamW betas.")
_C.SOLVER.WEIGHT_DECAY = Key(0.05, "Weight decay.")
_C.SOLVER.WEIGHT_DECAY_NORM = Key(0.0, "Weight decay of normalization layers.")
_C.SOLVER.WEIGHT_DECAY_EMBED = Key(0.0, "Weight decay of embeddings (queries, level embeds).")
_C.SOLVER.BACKBONE_MULTIPLIER = Key(0.1, "Learning-rate multiplier of the backbone.")
_C.SOLVER.MAX_ITER = Key(368750, "Training iterations.")
_C.SOLVER.LR_SCHEDULER_NAME = Key("WarmupMultiStepLR", "WarmupMultiStepLR or WarmupPolyLR.")
_C.SOLVER.STEPS = Key((327778, 355092), "Iterations at which the lr is multiplied by GAMMA.")
_C.SOLVER.GAMMA = Key(0.1, "Multi-step lr factor.")
_C.SOLVER.POLY_LR_POWER = Key(0.9, "Power of the poly schedule.")
_C.SOLVER.POLY_LR_CONSTANT_ENDING = Key(0.0, "Constant lr factor once poly drops below it.")
_C.SOLVER.WARMUP_FACTOR = Key(1.0, "Warmup start factor.")
_C.SOLVER.WARMUP_ITERS = Key(10, "Warmup iterations.")
_C.SOLVER.WARMUP_METHOD = Key("linear", "Warmup: linear or constant.")
_C.SOLVER.CHECKPOINT_PERIOD = Key(5000, "Save model_{iter:07d}.pth every N iterations.")
_C.SOLVER.CLIP_GRADIENTS = CN()
_C.SOLVER.CLIP_GRADIENTS.ENABLED = Key(True, "Clip gradients.")
_C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = Key("full_model", "full_model (one L2 norm) or norm / value.")
_C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = Key(0.01, "Clipping threshold.")
_C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = Key(2.0, "Norm type of clipping.")
_C.SOLVER.AMP = CN()
_C.SOLVER.AMP.ENABLED = Key(True, "Mixed precision (CUDA; on CPU only when PRECISION is bf16).")
_C.SOLVER.AMP.PRECISION = Key("fp16", "Mixed-precision dtype: fp16 (with grad scaler) or bf16.")
_C.SOLVER.LOG_PERIOD = Key(20, "Iterations per logging window (metrics.jsonl, console).")

# ---------------------------------------------------------------------------------------------
_C.TEST = CN()
_C.TEST.EVAL_PERIOD = Key(0, "Evaluate every N iterations during training (0 = only at the end).")
_C.TEST.IMS_PER_BATCH = Key(
    1,
    "Images per inference batch and process (1 as detectron2; a batch pads its images to the "
    "largest, so only same-size images give exactly the batch-1 predictions).",
)
_C.TEST.DETECTIONS_PER_IMAGE = Key(100, "Detections kept per image (top-k over queries x classes).")
_C.TEST.SCORE_THRESH = Key(0.0, "Drop detections scoring below this (evaluation keeps 0).")
_C.TEST.EVALUATOR = Key("auto", "auto (from the dataset), coco or cityscapes.")
_C.TEST.COCO_EVAL_BACKEND = Key(
    "faster_coco_eval", "COCOeval implementation: faster_coco_eval or pycocotools (same numbers)."
)
_C.TEST.AUG = CN()
_C.TEST.AUG.ENABLED = Key(False, "Compatibility (test-time augmentation is not implemented).")
_C.TEST.AUG.MIN_SIZES = Key((400, 500, 600, 700, 800, 900, 1000, 1100, 1200), "Compatibility.")
_C.TEST.AUG.MAX_SIZE = Key(4000, "Compatibility (test-time augmentation is not implemented).")
_C.TEST.AUG.FLIP = Key(True, "Compatibility (test-time augmentation is not implemented).")


def get_cfg() -> CN:
    """A fresh copy of the full default config."""
    return _C.clone()
