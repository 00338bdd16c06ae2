"""CUB-200-2011 (Wah et al., 2011) as image folders, with the common 100/50/50 class split, resized to
84x84 (the whole image, bicubic, RGB; no bounding-box crop), memory-mapped like Mini-ImageNet.

Layout: the official archive's images/ folder, DATA_ROOT/cub/CUB_200_2011/images/<NNN.Name>/*.jpg
(also looked for at DATA_ROOT/cub/images and DATA_ROOT/CUB_200_2011/images). All 200 class folders
must be there, and no others.

The split is Chen et al.'s (ICLR 2019, "A Closer Look at Few-shot Classification";
wyharveychen/CloserLookFewShot, filelists/CUB/write_CUB_filelist.py: sorted class folders, index i
from 0, i % 2 == 0 train, i % 4 == 1 val, i % 4 == 3 test), written out as torchmeta ships it:
tristandeleu/pytorch-meta, torchmeta/datasets/assets/cub/{train,val,test}.json.
"""
from __future__ import annotations

from pathlib import Path

from .common import SPLITS, DataError, ImageSet
from .folder import ClassFiles, cached_classes, image_set, scan_classes

SIZE = 84
SOURCE = "Chen et al. 2019 (A Closer Look at Few-shot Classification), 100/50/50 classes"

SPLIT = {
    "train": [
        "001.Black_footed_Albatross", "003.Sooty_Albatross", "005.Crested_Auklet", "007.Parakeet_Auklet",
        "009.Brewer_Blackbird", "011.Rusty_Blackbird", "013.Bobolink", "015.Lazuli_Bunting", "017.Cardinal",
        "019.Gray_Catbird", "021.Eastern_Towhee", "023.Brandt_Cormorant", "025.Pelagic_Cormorant",
        "027.Shiny_Cowbird", "029.American_Crow", "031.Black_billed_Cuckoo", "033.Yellow_billed_Cuckoo",
        "035.Purple_Finch", "037.Acadian_Flycatcher", "039.Least_Flycatcher",
        "041.Scissor_tailed_Flycatcher", "043.Yellow_bellied_Flycatcher", "045.Northern_Fulmar",
        "047.American_Goldfinch", "049.Boat_tailed_Grackle", "051.Horned_Grebe", "053.Western_Grebe",
        "055.Evening_Grosbeak", "057.Rose_breasted_Grosbeak", "059.California_Gull", "061.Heermann_Gull",
        "063.Ivory_Gull", "065.Slaty_backed_Gull", "067.Anna_Hummingbird", "069.Rufous_Hummingbird",
        "071.Long_tailed_Jaeger", "073.Blue_Jay", "075.Green_Jay", "077.Tropical_Kingbird",
        "079.Belted_Kingfisher", "081.Pied_Kingfisher", "083.White_breasted_Kingfisher", "085.Horned_Lark",
        "087.Mallard", "089.Hooded_Merganser", "091.Mockingbird", "093.Clark_Nutcracker",
        "095.Baltimore_Oriole", "097.Orchard_Oriole", "099.Ovenbird", "101.White_Pelican", "103.Sayornis",
        "105.Whip_poor_Will", "107.Common_Raven", "109.American_Redstart", "111.Loggerhead_Shrike",
        "113.Baird_Sparrow", "115.Brewer_Sparrow", "117.Clay_colored_Sparrow", "119.Field_Sparrow",
        "121.Grasshopper_Sparrow", "123.Henslow_Sparrow", "125.Lincoln_Sparrow", "127.Savannah_Sparrow",
        "129.Song_Sparrow", "131.Vesper_Sparrow", "133.White_throated_Sparrow", "135.Bank_Swallow",
        "137.Cliff_Swallow", "139.Scarlet_Tanager", "141.Artic_Tern", "143.Caspian_Tern", "145.Elegant_Tern",
        "147.Least_Tern", "149.Brown_Thrasher", "151.Black_capped_Vireo", "153.Philadelphia_Vireo",
        "155.Warbling_Vireo", "157.Yellow_throated_Vireo", "159.Black_and_white_Warbler",
        "161.Blue_winged_Warbler", "163.Cape_May_Warbler", "165.Chestnut_sided_Warbler",
        "167.Hooded_Warbler", "169.Magnolia_Warbler", "171.Myrtle_Warbler", "173.Orange_crowned_Warbler",
        "175.Pine_Warbler", "177.Prothonotary_Warbler", "179.Tennessee_Warbler", "181.Worm_eating_Warbler",
        "183.Northern_Waterthrush", "185.Bohemian_Waxwing", "187.American_Three_toed_Woodpecker",
        "189.Red_bellied_Woodpecker", "191.Red_headed_Woodpecker", "193.Bewick_Wren", "195.Carolina_Wren",
        "197.Marsh_Wren", "199.Winter_Wren",
    ],
    "val": [
        "002.Laysan_Albatross", "006.Least_Auklet", "010.Red_winged_Blackbird", "014.Indigo_Bunting",
        "018.Spotted_Catbird", "022.Chuck_will_Widow", "026.Bronzed_Cowbird", "030.Fish_Crow",
        "034.Gray_crowned_Rosy_Finch", "038.Great_Crested_Flycatcher", "042.Vermilion_Flycatcher",
        "046.Gadwall", "050.Eared_Grebe", "054.Blue_Grosbeak", "058.Pigeon_Guillemot", "062.Herring_Gull",
        "066.Western_Gull", "070.Green_Violetear", "074.Florida_Jay", "078.Gray_Kingbird",
        "082.Ringed_Kingfisher", "086.Pacific_Loon", "090.Red_breasted_Merganser",
        "094.White_breasted_Nuthatch", "098.Scott_Oriole", "102.Western_Wood_Pewee", "106.Horned_Puffin",
        "110.Geococcyx", "114.Black_throated_Sparrow", "118.House_Sparrow", "122.Harris_Sparrow",
        "126.Nelson_Sharp_tailed_Sparrow", "130.Tree_Sparrow", "134.Cape_Glossy_Starling",
        "138.Tree_Swallow", "142.Black_Tern", "146.Forsters_Tern", "150.Sage_Thrasher", "154.Red_eyed_Vireo",
        "158.Bay_breasted_Warbler", "162.Canada_Warbler", "166.Golden_winged_Warbler",
        "170.Mourning_Warbler", "174.Palm_Warbler", "178.Swainson_Warbler", "182.Yellow_Warbler",
        "186.Cedar_Waxwing", "190.Red_cockaded_Woodpecker", "194.Cactus_Wren", "198.Rock_Wren",
    ],
    "test": [
        "004.Groove_billed_Ani", "008.Rhinoceros_Auklet", "012.Yellow_headed_Blackbird",
        "016.Painted_Bunting", "020.Yellow_breasted_Chat", "024.Red_faced_Cormorant", "028.Brown_Creeper",
        "032.Mangrove_Cuckoo", "036.Northern_Flicker", "040.Olive_sided_Flycatcher", "044.Frigatebird",
        "048.European_Goldfinch", "052.Pied_billed_Grebe", "056.Pine_Grosbeak", "060.Glaucous_winged_Gull",
        "064.Ring_billed_Gull", "068.Ruby_throated_Hummingbird", "072.Pomarine_Jaeger",
        "076.Dark_eyed_Junco", "080.Green_Kingfisher", "084.Red_legged_Kittiwake", "088.Western_Meadowlark",
        "092.Nighthawk", "096.Hooded_Oriole", "100.Brown_Pelican", "104.American_Pipit",
        "108.White_necked_Raven", "112.Great_Grey_Shrike", "116.Chipping_Sparrow", "120.Fox_Sparrow",
        "124.Le_Conte_Sparrow", "128.Seaside_Sparrow", "132.White_crowned_Sparrow", "136.Barn_Swallow",
        "140.Summer_Tanager", "144.Common_Tern", "148.Green_tailed_Towhee", "152.Blue_headed_Vireo",
        "156.White_eyed_Vireo", "160.Black_throated_Blue_Warbler", "164.Cerulean_Warbler",
        "168.Kentucky_Warbler", "172.Nashville_Warbler", "176.Prairie_Warbler", "180.Wilson_Warbler",
        "184.Louisiana_Waterthrush", "188.Pileated_Woodpecker", "192.Downy_Woodpecker", "196.House_Wren",
        "200.Common_Yellowthroat",
    ],
}


def image_dirs(root: Path) -> list[Path]:
    root = Path(root)
    return [root / "cub" / "CUB_200_2011" / "images", root / "cub" / "images", root / "CUB_200_2011" / "images"]


def find_images(root: Path) -> Path:
    for d in image_dirs(root):
        if d.is_dir():
            return d
    raise DataError(f"CUB-200-2011 not found: expected its images/ folder (200 class folders such as "
                    f"001.Black_footed_Albatross/*.jpg) at {image_dirs(root)[0]} (or {image_dirs(root)[1]}, "
                    f"{image_dirs(root)[2]})")


def split_classes(images_dir: Path) -> list[ClassFiles]:
    """The class folders in split order (train, val, test; each in list order), every listed folder
    present and non-empty, no other folder."""
    found = {c.name: c for c in scan_classes(images_dir)}
    listed = {name: split for split in SPLITS for name in SPLIT[split]}
    extra = sorted(set(found) - set(listed))
    if extra:
        raise DataError(f"{images_dir}: folder {extra[0]} is not one of the 200 CUB-200-2011 classes"
                        + (f" ({len(extra)} such folders)" if len(extra) > 1 else ""))
    missing = [name for name in listed if name not in found]
    if missing:
        raise DataError(f"{images_dir}: has no folder {missing[0]} (a class of the CUB {listed[missing[0]]} split)"
                        + (f"; {len(missing)} of the 200 class folders are missing" if len(missing) > 1 else ""))
    return [ClassFiles(name, split, found[name].files) for split in SPLITS for name in SPLIT[split]]


def load_cub(data_cfg, root: Path, cache_root: Path, force: bool = False) -> ImageSet:
    size = data_cfg.image_size or SIZE
    if data_cfg.channels not in (0, 3):
        raise DataError(f"data.channels={data_cfg.channels}: CUB-200-2011 is read as RGB (3 channels)")
    images_dir = find_images(root)
    classes = split_classes(images_dir)
    images, manifest, folder, fp = cached_classes(classes, "cub", "folders", images_dir, size, 3, cache_root, force,
                                                  {"split": SOURCE})
    data = image_set("cub", images, manifest, folder, {str(images_dir): fp}, (0.5, 0.25, 0.25))
    data.split_source = SOURCE
    return data
