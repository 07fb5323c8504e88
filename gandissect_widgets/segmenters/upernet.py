"""The Unified Perceptual Parsing segmenter of the GAN Dissection papers (UPerNet on a ResNet-50).

Files (one folder): ``labels.json`` (keys ``object``, ``material``, ``part``, ``scene``, ``object_part``),
``encoder_epoch_40.pth`` (the CSAIL ResNet-50, ``segmenters.resnet``) and ``decoder_epoch_40.pth``
(UPerNet, fpn_dim 512: a PPM on C5 with PrRoI pooling in bins 1, 2, 3, 6, an FPN on C2..C4, a
fusion conv, and scene/object/part/material heads).  Its CUDA-only PrRoIPool is replaced by the
exact pure-torch ``prroi_pool_full``.  Widths are read from the files, strictly checked.

Input convention kept from the original: images in [-1,1] -> [0,255] -> BGR -> minus
[102.9801, 115.9465, 122.7717] (no division), average-pooled to each of ``segsizes`` (skipped when
the size already matches) and the softmaxed predictions summed.

Output ``S(images)``: (N, 3, H/d, W/d) long, channels object / material / part, all in one label
space: ``labels`` = ["-"] + objects + materials + parts of ``part_objects`` (a part that is also
an object, such as "door", keeps the object's index; a material or part whose name is taken gets
" (material)" / " (part)" appended).  ``categories[i]`` says which.  ``quad=True`` adds two channels
of quadrant labels "<object>-t/-l/-b/-r" (top/left/bottom/right of each connected object region).
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from gandissect_widgets.checkpoint import CheckpointError, load_strict, strip_prefix, torch_load, unwrap_state_dict
from gandissect_widgets.download import cached_file
from gandissect_widgets.segmenters.prroi_pool import prroi_pool_full
from gandissect_widgets.segmenters.resnet import DeepStemResNet, resnet_arch_from_state_dict

__all__ = ["UPerNet", "UnifiedParsingSegmenter", "load_upernet", "UPP_URL", "UPP_MEAN_BGR"]

UPP_URL = "https://dissect.csail.mit.edu/models/segmodel/upp-resnet50-upernet/"
UPP_MEAN_BGR = (102.9801, 115.9465, 122.7717)
DEFAULT_PART_OBJECTS = ("sky", "building", "person")


def conv3x3_bn_relu(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PrRoIPool(nn.Module):
    """PrRoIPool of the whole map into ``bins`` x ``bins`` (no parameters)."""

    def __init__(self, bins):
        super().__init__()
        self.bins = bins

    def forward(self, x):
        return prroi_pool_full(x, self.bins)


class UPerNet(nn.Module):
    """The UPP decoder; ``forward([C2..C5])`` -> dict of logits ``scene``, ``object``, ``part``, ``material``."""

    def __init__(self, nr_classes: dict, fc_dim=2048, pool_scales=(1, 2, 3, 6), fpn_inplanes=(256, 512, 1024, 2048),
                 fpn_dim=512, ppm_dim=512):
        super().__init__()
        self.ppm_pooling = nn.ModuleList([PrRoIPool(s) for s in pool_scales])
        self.ppm_conv = nn.ModuleList([nn.Sequential(nn.Conv2d(fc_dim, ppm_dim, 1, bias=False), nn.BatchNorm2d(ppm_dim),
                                                     nn.ReLU(inplace=True)) for _ in pool_scales])
        self.ppm_last_conv = conv3x3_bn_relu(fc_dim + len(pool_scales) * ppm_dim, fpn_dim)
        self.fpn_in = nn.ModuleList([nn.Sequential(nn.Conv2d(c, fpn_dim, 1, bias=False), nn.BatchNorm2d(fpn_dim),
                                                   nn.ReLU(inplace=True)) for c in fpn_inplanes[:-1]])
        self.fpn_out = nn.ModuleList([nn.Sequential(conv3x3_bn_relu(fpn_dim, fpn_dim)) for _ in fpn_inplanes[:-1]])
        self.conv_fusion = conv3x3_bn_relu(len(fpn_inplanes) * fpn_dim, fpn_dim)
        self.scene_head = nn.Sequential(conv3x3_bn_relu(fpn_dim, fpn_dim), nn.AdaptiveAvgPool2d(1),
                                        nn.Conv2d(fpn_dim, nr_classes["scene"], 1, bias=True))
        self.object_head = nn.Sequential(conv3x3_bn_relu(fpn_dim, fpn_dim), nn.Conv2d(fpn_dim, nr_classes["object"], 1))
        self.part_head = nn.Sequential(conv3x3_bn_relu(fpn_dim, fpn_dim), nn.Conv2d(fpn_dim, nr_classes["part"], 1))
        self.material_head = nn.Sequential(conv3x3_bn_relu(fpn_dim, fpn_dim),
                                           nn.Conv2d(fpn_dim, nr_classes["material"], 1))

    def forward(self, conv_out, scene=False):
        conv5 = conv_out[-1]
        size = conv5.shape[2:]
        ppm_out = [conv5]
        for pool, conv in zip(self.ppm_pooling, self.ppm_conv):
            ppm_out.append(conv(F.interpolate(pool(conv5), size, mode="bilinear", align_corners=False)))
        f = self.ppm_last_conv(torch.cat(ppm_out, 1))
        out = {"scene": self.scene_head(f)} if scene else {}
        fpn = [f]
        for i in reversed(range(len(conv_out) - 1)):
            lateral = self.fpn_in[i](conv_out[i])
            f = lateral + F.interpolate(f, size=lateral.shape[2:], mode="bilinear", align_corners=False)
            fpn.append(self.fpn_out[i](f))
        fpn.reverse()  # P2 .. P5
        out["material"] = self.material_head(fpn[0])
        size2 = fpn[0].shape[2:]
        fusion = torch.cat([fpn[0]] + [F.interpolate(p, size2, mode="bilinear", align_corners=False)
                                       for p in fpn[1:]], 1)
        x = self.conv_fusion(fusion)
        out["object"], out["part"] = self.object_head(x), self.part_head(x)
        return out


def _unique(name, taken, category):
    return name if name not in taken else f"{name} ({category})"


class UnifiedParsingSegmenter(nn.Module):
    """UPP segmenter with the protocol; see the module docstring for labels and channels."""

    def __init__(self, encoder: DeepStemResNet, decoder: UPerNet, labeldata: dict, segsizes=(256,), downsample=1,
                 quad=False, part_objects=DEFAULT_PART_OBJECTS):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.segsizes = None if segsizes is None else tuple(int(s) for s in segsizes)
        self.downsample, self.quad = int(downsample), bool(quad)
        objects, materials = list(labeldata["object"]), list(labeldata["material"])
        object_part = labeldata["object_part"]
        obj_num = {k: v for v, k in enumerate(objects)}
        # part logits are ordered by owner object index, each owner's parts in its list order
        owners = sorted(obj_num[k] for k in object_part)
        self._part_slices, head = {}, 0
        for o in owners:
            n = len(object_part[objects[o]])
            self._part_slices[o] = (head, head + n)
            head += n
        if part_objects == "all":
            part_objects = [objects[o] for o in owners]
        unknown = [p for p in part_objects if p not in object_part]
        if unknown:
            raise ValueError(f"part_objects {unknown} have no parts in labels.json; objects with parts: "
                             f"{sorted(object_part)}")
        n_obj = len(objects) - 1
        mult = 5 if self.quad else 1
        labels = list(objects)
        cats = ["-"] + ["object"] * n_obj
        if self.quad:
            for suffix in ("t", "l", "b", "r"):
                labels += [f"{o}-{suffix}" for o in objects[1:]]
                cats += ["part"] * n_obj
        taken = set(labels)
        for m in materials[1:]:
            labels.append(_unique(m, taken, "material"))
            taken.add(labels[-1])
            cats.append("material")
        part_numbers, translations = {}, []
        for owner in part_objects:
            nums = []
            for part in object_part[owner]:
                if part in obj_num:
                    nums.append(obj_num[part])
                else:
                    if part not in part_numbers:
                        part_numbers[part] = len(labels)
                        labels.append(_unique(part, taken, "part"))
                        taken.add(labels[-1])
                        cats.append("part")
                    nums.append(part_numbers[part])
            translations.append(torch.tensor(nums))
        self.labels, self.categories = labels, cats
        self.num_objects, self.material_offset = n_obj, n_obj * mult
        self.part_owners = [obj_num[o] for o in part_objects]
        for i, t in enumerate(translations):
            self.register_buffer(f"part_translation_{i}", t, persistent=False)
        self.register_buffer("mean_bgr", torch.tensor(UPP_MEAN_BGR).view(1, 3, 1, 1), persistent=False)

    @property
    def fingerprint(self) -> str:
        return f"segsizes={self.segsizes};downsample={self.downsample};quad={self.quad};owners={self.part_owners}"

    def raw_predictions(self, images):
        """Summed softmax over ``segsizes``: object (N,O,h,w), material (N,M,h,w), parts {owner: (N,P,h,w)}."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"UPP segmenter expects images (N,3,H,W) in [-1,1], got shape {tuple(images.shape)}")
        H, W = images.shape[2:]
        seg = (H // self.downsample, W // self.downsample)
        x = torch.flip((images + 1) / 2 * 255, (1,)) - self.mean_bgr.to(images.dtype)
        sizes = [(s, s) for s in self.segsizes] if self.segsizes else [(H, W)]
        pred, parts = {}, {}
        for size in sizes:
            xs = x if tuple(size) == (H, W) else F.adaptive_avg_pool2d(x, size)
            logits = self.decoder(self.encoder(xs))
            for k in ("object", "material"):
                p = F.softmax(F.interpolate(logits[k], size=seg, mode="bilinear", align_corners=False), dim=1)
                pred[k] = pred[k] + p if k in pred else p
            part = F.interpolate(logits["part"], size=seg, mode="bilinear", align_corners=False)
            for o in self.part_owners:
                a, b = self._part_slices[o]
                p = F.softmax(part[:, a:b], dim=1)
                parts[o] = parts[o] + p if o in parts else p
        return pred, parts

    def forward(self, images):
        pred, parts = self.raw_predictions(images)
        obj = pred["object"].argmax(1)
        mat = pred["material"].argmax(1)
        mat = torch.where(mat == 0, mat, mat + self.material_offset)
        part = torch.zeros_like(obj)
        for i, o in enumerate(self.part_owners):
            trans = getattr(self, f"part_translation_{i}")
            p = trans[parts[o].argmax(1)]
            part = torch.where(obj == o, p, part)
        segs = torch.stack([obj, mat, part], 1)
        if self.quad:
            segs = torch.cat([segs, self._quadrants(obj)], 1)
        return segs

    def probabilities(self, images):
        """(N, len(labels), h, w): object and material softmax; a part's probability is its owner's times
        the part's (the larger of that and the object's, for parts that are objects); quadrant labels 0."""
        pred, parts = self.raw_predictions(images)
        n_sizes = len(self.segsizes) if self.segsizes else 1
        obj, mat = pred["object"] / n_sizes, pred["material"] / n_sizes
        N, _, h, w = obj.shape
        cols = [obj]
        if self.quad:
            cols.append(obj.new_zeros(N, 4 * self.num_objects, h, w))
        cols.append(mat[:, 1:])
        n_parts = len(self.labels) - (1 + self.num_objects * (5 if self.quad else 1) + mat.shape[1] - 1)
        cols.append(obj.new_zeros(N, n_parts, h, w))
        chans = list(torch.cat(cols, 1).unbind(1))
        for i, o in enumerate(self.part_owners):
            pp = obj[:, o, None] * parts[o] / n_sizes
            for j, label in enumerate(getattr(self, f"part_translation_{i}").tolist()):
                chans[label] = torch.maximum(chans[label], pp[:, j])
        return torch.stack(chans, 1)

    def _quadrants(self, obj):
        """Two channels: object label + k*num_objects for the top/bottom and left/right halves of each region."""
        n = self.num_objects
        tb, lr = torch.zeros_like(obj), torch.zeros_like(obj)
        comps = _connected_components(obj)
        for b in range(obj.shape[0]):
            for c in comps[b].unique().tolist():
                if c < 0:
                    continue
                mask = comps[b] == c
                rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
                vmid = (int(rows[0]) + int(rows[-1]) + 1) // 2
                hmid = (int(cols[0]) + int(cols[-1]) + 1) // 2
                label = obj[b][mask][0]
                top, left = mask.clone(), mask.clone()
                top[vmid:] = False
                left[:, hmid:] = False
                tb[b][top], tb[b][mask & ~top] = label + n, label + 3 * n
                lr[b][left], lr[b][mask & ~left] = label + 2 * n, label + 4 * n
        return torch.stack([tb, lr], 1)


def _connected_components(labels):
    """(N,H,W) component ids (4-connected regions of equal nonzero label; -1 for label 0)."""
    N, H, W = labels.shape
    big = N * H * W
    ids = torch.arange(big, device=labels.device).view(N, H, W)
    ids = torch.where(labels > 0, ids, torch.full_like(ids, big))
    while True:
        new = ids.clone()
        for dim, shift in ((1, 1), (1, -1), (2, 1), (2, -1)):
            nb = torch.roll(ids, shift, dim)
            nl = torch.roll(labels, shift, dim)
            valid = nl == labels
            if dim == 1:
                edge = slice(0, 1) if shift == 1 else slice(H - 1, H)
                valid[:, edge] = False
            else:
                edge = slice(0, 1) if shift == 1 else slice(W - 1, W)
                valid[:, :, edge] = False
            new = torch.where(valid & (labels > 0), torch.minimum(new, nb), new)
        if torch.equal(new, ids):
            break
        ids = new
    return torch.where(labels > 0, ids, torch.full_like(ids, -1))


def upernet_from_state_dicts(encoder_sd, decoder_sd, labeldata, source="UPP checkpoint", **options):
    """Build and strictly load the UPP model from its two state dicts and its label data."""
    encoder_sd = strip_prefix(unwrap_state_dict(encoder_sd))
    decoder_sd = strip_prefix(unwrap_state_dict(decoder_sd))
    arch = resnet_arch_from_state_dict(encoder_sd)
    if arch is None:
        raise CheckpointError(f"{source}: the encoder is not a CSAIL ResNet (expected conv1.weight and "
                              f"layer1..layer4.N.conv1.weight keys; first keys {list(encoder_sd)[:6]})")
    need = ["ppm_last_conv.0.weight", "ppm_conv.0.0.weight", "object_head.1.weight", "part_head.1.weight",
            "material_head.1.weight", "scene_head.2.weight"]
    if any(k not in decoder_sd for k in need):
        raise CheckpointError(f"{source}: the decoder is not in the UPP UPerNet layout; missing "
                              f"{[k for k in need if k not in decoder_sd]}")
    for key in ("object", "material", "scene", "object_part"):
        if key not in labeldata:
            raise CheckpointError(f"{source}: labels.json lacks the key {key!r} (has {sorted(labeldata)})")
    nr = {"object": len(labeldata["object"]), "material": len(labeldata["material"]),
          "scene": len(labeldata["scene"]), "part": sum(len(p) for p in labeldata["object_part"].values())}
    heads = {"object": "object_head.1.weight", "material": "material_head.1.weight", "part": "part_head.1.weight",
             "scene": "scene_head.2.weight"}
    for k, key in heads.items():
        if decoder_sd[key].shape[0] != nr[k]:
            raise CheckpointError(f"{source}: the {k} head has {decoder_sd[key].shape[0]} classes but labels.json "
                                  f"lists {nr[k]}")
    encoder = DeepStemResNet(**arch)
    load_strict(encoder, encoder_sd, "CSAIL ResNet encoder (conv1..bn3, layer1..layer4)", f"{source} encoder")
    decoder = UPerNet(nr, fc_dim=encoder.out_channels[-1], fpn_inplanes=tuple(encoder.out_channels),
                      fpn_dim=int(decoder_sd["ppm_last_conv.0.weight"].shape[0]),
                      ppm_dim=int(decoder_sd["ppm_conv.0.0.weight"].shape[0]),
                      pool_scales=(1, 2, 3, 6)[:sum(1 for k in decoder_sd if k.endswith(".0.weight")
                                                    and k.startswith("ppm_conv."))])
    load_strict(decoder, decoder_sd, "UPP UPerNet decoder (ppm, fpn, fusion, 4 heads)", f"{source} decoder")
    return UnifiedParsingSegmenter(encoder, decoder, labeldata, **options).eval()


def load_upernet(checkpoint=None, device="cpu", segsizes=(256,), downsample=1, quad=False,
                 part_objects=DEFAULT_PART_OBJECTS, epoch=40, progress=True, trust_pickle=False):
    """The UPP segmenter from a folder (labels.json, encoder/decoder_epoch_40.pth), or downloaded to the cache.

    Downloaded files are checked against the SHA-256 recorded when they were downloaded before they
    are read (``download.cached_file``); a folder given as ``checkpoint`` is the user's and is read as is.
    Weights load as weights only; ``trust_pickle=True`` (``--trust-pickle``) reads a folder's ``.pth``
    files that hold other pickled objects in full, which runs code stored in them."""
    files = ["labels.json", f"encoder_epoch_{epoch}.pth", f"decoder_epoch_{epoch}.pth"]
    if checkpoint is None:
        paths = [cached_file(UPP_URL + f, subdir="segmodel/upp-resnet50-upernet", progress=progress) for f in files]
        source = os.path.dirname(paths[0])
    else:
        folder = os.fspath(checkpoint)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"UPP checkpoint must be a folder holding {', '.join(files)}; got {folder}")
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if missing:
            raise FileNotFoundError(f"UPP folder {folder} lacks {missing} (it needs {', '.join(files)})")
        paths, source = [os.path.join(folder, f) for f in files], folder
    with open(paths[0]) as f:
        labeldata = json.load(f)
    encoder_sd, decoder_sd = (torch_load(p, trust=trust_pickle) for p in paths[1:])
    S = upernet_from_state_dicts(encoder_sd, decoder_sd, labeldata, source=source,
                                 segsizes=segsizes, downsample=downsample, quad=quad, part_objects=part_objects)
    return S.to(device)
