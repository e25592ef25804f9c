"""Class names of the benchmark datasets, stated as data, and helpers for prompts.

Names are in *label order*: entry `i` is the name of dataset label `i`, matching the readers in
this package (CIFAR-100 fine labels in the archive's order; ImageNet-R and ImageNet-100 by sorted
WordNet id, which is also how ImageNet-1k labels are numbered; CUB-200 by its `classes.txt` id).
The ImageNet tables hold `(wnid, name)` pairs so that a folder tree or a TFDS ImageNet-1k label
can be mapped to the benchmark's label by its wnid. Where the user's files carry names
(`meta`, `classes.txt`, `LOC_synset_mapping.txt`), the readers prefer those and fall back here.
"""

from __future__ import annotations

from collections.abc import Sequence

# fmt: off
# CIFAR-100 fine labels, label order (alphabetical, as in the archive's `meta`).
CIFAR100 = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar",
    "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile",
    "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster",
    "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster",
    "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman",
    "worm",
)
# ImageNet-R: its 200 ImageNet classes as (wnid, name), label = index in sorted-wnid order.
IMAGENET_R = (
    ("n01443537", "goldfish"), ("n01484850", "great_white_shark"), ("n01494475", "hammerhead"),
    ("n01498041", "stingray"), ("n01514859", "hen"), ("n01518878", "ostrich"),
    ("n01531178", "goldfinch"), ("n01534433", "junco"), ("n01614925", "bald_eagle"),
    ("n01616318", "vulture"), ("n01630670", "common_newt"), ("n01632777", "axolotl"),
    ("n01644373", "tree_frog"), ("n01677366", "common_iguana"), ("n01694178", "African_chameleon"),
    ("n01748264", "Indian_cobra"), ("n01770393", "scorpion"), ("n01774750", "tarantula"),
    ("n01784675", "centipede"), ("n01806143", "peacock"), ("n01820546", "lorikeet"),
    ("n01833805", "hummingbird"), ("n01843383", "toucan"), ("n01847000", "drake"),
    ("n01855672", "goose"), ("n01860187", "black_swan"), ("n01882714", "koala"),
    ("n01910747", "jellyfish"), ("n01944390", "snail"), ("n01983481", "American_lobster"),
    ("n01986214", "hermit_crab"), ("n02007558", "flamingo"), ("n02009912", "American_egret"),
    ("n02051845", "pelican"), ("n02056570", "king_penguin"), ("n02066245", "grey_whale"),
    ("n02071294", "killer_whale"), ("n02077923", "sea_lion"), ("n02085620", "Chihuahua"),
    ("n02086240", "Shih-Tzu"), ("n02088094", "Afghan_hound"), ("n02088238", "basset"),
    ("n02088364", "beagle"), ("n02088466", "bloodhound"), ("n02091032", "Italian_greyhound"),
    ("n02091134", "whippet"), ("n02092339", "Weimaraner"), ("n02094433", "Yorkshire_terrier"),
    ("n02096585", "Boston_bull"), ("n02097298", "Scotch_terrier"),
    ("n02098286", "West_Highland_white_terrier"), ("n02099601", "golden_retriever"),
    ("n02099712", "Labrador_retriever"), ("n02102318", "cocker_spaniel"), ("n02106030", "collie"),
    ("n02106166", "Border_collie"), ("n02106550", "Rottweiler"), ("n02106662", "German_shepherd"),
    ("n02108089", "boxer"), ("n02108915", "French_bulldog"), ("n02109525", "Saint_Bernard"),
    ("n02110185", "Siberian_husky"), ("n02110341", "dalmatian"), ("n02110958", "pug"),
    ("n02112018", "Pomeranian"), ("n02112137", "chow"), ("n02113023", "Pembroke"),
    ("n02113624", "toy_poodle"), ("n02113799", "standard_poodle"), ("n02114367", "timber_wolf"),
    ("n02117135", "hyena"), ("n02119022", "red_fox"), ("n02123045", "tabby"),
    ("n02128385", "leopard"), ("n02128757", "snow_leopard"), ("n02129165", "lion"),
    ("n02129604", "tiger"), ("n02130308", "cheetah"), ("n02134084", "ice_bear"),
    ("n02138441", "meerkat"), ("n02165456", "ladybug"), ("n02190166", "fly"), ("n02206856", "bee"),
    ("n02219486", "ant"), ("n02226429", "grasshopper"), ("n02233338", "cockroach"),
    ("n02236044", "mantis"), ("n02268443", "dragonfly"), ("n02279972", "monarch"),
    ("n02317335", "starfish"), ("n02325366", "wood_rabbit"), ("n02346627", "porcupine"),
    ("n02356798", "fox_squirrel"), ("n02363005", "beaver"), ("n02364673", "guinea_pig"),
    ("n02391049", "zebra"), ("n02395406", "hog"), ("n02398521", "hippopotamus"),
    ("n02410509", "bison"), ("n02423022", "gazelle"), ("n02437616", "llama"),
    ("n02445715", "skunk"), ("n02447366", "badger"), ("n02480495", "orangutan"),
    ("n02480855", "gorilla"), ("n02481823", "chimpanzee"), ("n02483362", "gibbon"),
    ("n02486410", "baboon"), ("n02510455", "giant_panda"), ("n02526121", "eel"),
    ("n02607072", "anemone_fish"), ("n02655020", "puffer"), ("n02672831", "accordion"),
    ("n02701002", "ambulance"), ("n02749479", "assault_rifle"), ("n02769748", "backpack"),
    ("n02793495", "barn"), ("n02797295", "barrow"), ("n02802426", "basketball"),
    ("n02808440", "bathtub"), ("n02814860", "beacon"), ("n02823750", "beer_glass"),
    ("n02841315", "binoculars"), ("n02843684", "birdhouse"), ("n02883205", "bow_tie"),
    ("n02906734", "broom"), ("n02909870", "bucket"), ("n02939185", "caldron"),
    ("n02948072", "candle"), ("n02950826", "cannon"), ("n02951358", "canoe"),
    ("n02966193", "carousel"), ("n02980441", "castle"), ("n02992529", "cellular_telephone"),
    ("n03124170", "cowboy_hat"), ("n03272010", "electric_guitar"), ("n03345487", "fire_engine"),
    ("n03372029", "flute"), ("n03424325", "gasmask"), ("n03452741", "grand_piano"),
    ("n03467068", "guillotine"), ("n03481172", "hammer"), ("n03494278", "harmonica"),
    ("n03495258", "harp"), ("n03498962", "hatchet"), ("n03594945", "jeep"),
    ("n03602883", "joystick"), ("n03630383", "lab_coat"), ("n03649909", "lawn_mower"),
    ("n03676483", "lipstick"), ("n03710193", "mailbox"), ("n03773504", "missile"),
    ("n03775071", "mitten"), ("n03888257", "parachute"), ("n03930630", "pickup"),
    ("n03947888", "pirate"), ("n04086273", "revolver"), ("n04118538", "rugby_ball"),
    ("n04133789", "sandal"), ("n04141076", "sax"), ("n04146614", "school_bus"),
    ("n04147183", "schooner"), ("n04192698", "shield"), ("n04254680", "soccer_ball"),
    ("n04266014", "space_shuttle"), ("n04275548", "spider_web"), ("n04310018", "steam_locomotive"),
    ("n04325704", "stole"), ("n04347754", "submarine"), ("n04389033", "tank"),
    ("n04409515", "tennis_ball"), ("n04465501", "tractor"), ("n04487394", "trombone"),
    ("n04522168", "vase"), ("n04536866", "violin"), ("n04552348", "warplane"),
    ("n04591713", "wine_bottle"), ("n07614500", "ice_cream"), ("n07693725", "bagel"),
    ("n07695742", "pretzel"), ("n07697313", "cheeseburger"), ("n07697537", "hotdog"),
    ("n07714571", "head_cabbage"), ("n07714990", "broccoli"), ("n07718472", "cucumber"),
    ("n07720875", "bell_pepper"), ("n07734744", "mushroom"), ("n07742313", "Granny_Smith"),
    ("n07745940", "strawberry"), ("n07749582", "lemon"), ("n07753275", "pineapple"),
    ("n07753592", "banana"), ("n07768694", "pomegranate"), ("n07873807", "pizza"),
    ("n07880968", "burrito"), ("n07920052", "espresso"), ("n09472597", "volcano"),
    ("n09835506", "ballplayer"), ("n10565667", "scuba_diver"), ("n12267677", "acorn"),
)
# ImageNet-100 of the Continual-CLIP protocol: the first 100 ImageNet-1k classes (sorted wnids).
IMAGENET100 = (
    ("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
    ("n01491361", "tiger shark"), ("n01494475", "hammerhead shark"), ("n01496331", "electric ray"),
    ("n01498041", "stingray"), ("n01514668", "rooster"), ("n01514859", "hen"),
    ("n01518878", "ostrich"), ("n01530575", "brambling"), ("n01531178", "goldfinch"),
    ("n01532829", "house finch"), ("n01534433", "junco"), ("n01537544", "indigo bunting"),
    ("n01558993", "American robin"), ("n01560419", "bulbul"), ("n01580077", "jay"),
    ("n01582220", "magpie"), ("n01592084", "chickadee"), ("n01601694", "American dipper"),
    ("n01608432", "kite (bird of prey)"), ("n01614925", "bald eagle"), ("n01616318", "vulture"),
    ("n01622779", "great grey owl"), ("n01629819", "fire salamander"),
    ("n01630670", "smooth newt"), ("n01631663", "newt"), ("n01632458", "spotted salamander"),
    ("n01632777", "axolotl"), ("n01641577", "American bullfrog"), ("n01644373", "tree frog"),
    ("n01644900", "tailed frog"), ("n01664065", "loggerhead sea turtle"),
    ("n01665541", "leatherback sea turtle"), ("n01667114", "mud turtle"),
    ("n01667778", "terrapin"), ("n01669191", "box turtle"), ("n01675722", "banded gecko"),
    ("n01677366", "green iguana"), ("n01682714", "Carolina anole"),
    ("n01685808", "desert grassland whiptail lizard"), ("n01687978", "agama"),
    ("n01688243", "frilled-necked lizard"), ("n01689811", "alligator lizard"),
    ("n01692333", "Gila monster"), ("n01693334", "European green lizard"),
    ("n01694178", "chameleon"), ("n01695060", "Komodo dragon"), ("n01697457", "Nile crocodile"),
    ("n01698640", "American alligator"), ("n01704323", "triceratops"), ("n01728572", "worm snake"),
    ("n01728920", "ring-necked snake"), ("n01729322", "eastern hog-nosed snake"),
    ("n01729977", "smooth green snake"), ("n01734418", "kingsnake"), ("n01735189", "garter snake"),
    ("n01737021", "water snake"), ("n01739381", "vine snake"), ("n01740131", "night snake"),
    ("n01742172", "boa constrictor"), ("n01744401", "African rock python"),
    ("n01748264", "Indian cobra"), ("n01749939", "green mamba"), ("n01751748", "sea snake"),
    ("n01753488", "Saharan horned viper"), ("n01755581", "eastern diamondback rattlesnake"),
    ("n01756291", "sidewinder rattlesnake"), ("n01768244", "trilobite"),
    ("n01770081", "harvestman"), ("n01770393", "scorpion"), ("n01773157", "yellow garden spider"),
    ("n01773549", "barn spider"), ("n01773797", "European garden spider"),
    ("n01774384", "southern black widow"), ("n01774750", "tarantula"),
    ("n01775062", "wolf spider"), ("n01776313", "tick"), ("n01784675", "centipede"),
    ("n01795545", "black grouse"), ("n01796340", "ptarmigan"), ("n01797886", "ruffed grouse"),
    ("n01798484", "prairie grouse"), ("n01806143", "peafowl"), ("n01806567", "quail"),
    ("n01807496", "partridge"), ("n01817953", "african grey parrot"), ("n01818515", "macaw"),
    ("n01819313", "sulphur-crested cockatoo"), ("n01820546", "lorikeet"), ("n01824575", "coucal"),
    ("n01828970", "bee eater"), ("n01829413", "hornbill"), ("n01833805", "hummingbird"),
    ("n01843065", "jacamar"), ("n01843383", "toucan"), ("n01847000", "duck"),
    ("n01855032", "red-breasted merganser"), ("n01855672", "goose"),
)
# CUB-200-2011, label = class id - 1 (`classes.txt`), names without the `001.` prefix.
CUB200 = (
    "Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Groove_billed_Ani",
    "Crested_Auklet", "Least_Auklet", "Parakeet_Auklet", "Rhinoceros_Auklet", "Brewer_Blackbird",
    "Red_winged_Blackbird", "Rusty_Blackbird", "Yellow_headed_Blackbird", "Bobolink",
    "Indigo_Bunting", "Lazuli_Bunting", "Painted_Bunting", "Cardinal", "Spotted_Catbird",
    "Gray_Catbird", "Yellow_breasted_Chat", "Eastern_Towhee", "Chuck_will_Widow",
    "Brandt_Cormorant", "Red_faced_Cormorant", "Pelagic_Cormorant", "Bronzed_Cowbird",
    "Shiny_Cowbird", "Brown_Creeper", "American_Crow", "Fish_Crow", "Black_billed_Cuckoo",
    "Mangrove_Cuckoo", "Yellow_billed_Cuckoo", "Gray_crowned_Rosy_Finch", "Purple_Finch",
    "Northern_Flicker", "Acadian_Flycatcher", "Great_Crested_Flycatcher", "Least_Flycatcher",
    "Olive_sided_Flycatcher", "Scissor_tailed_Flycatcher", "Vermilion_Flycatcher",
    "Yellow_bellied_Flycatcher", "Frigatebird", "Northern_Fulmar", "Gadwall", "American_Goldfinch",
    "European_Goldfinch", "Boat_tailed_Grackle", "Eared_Grebe", "Horned_Grebe",
    "Pied_billed_Grebe", "Western_Grebe", "Blue_Grosbeak", "Evening_Grosbeak", "Pine_Grosbeak",
    "Rose_breasted_Grosbeak", "Pigeon_Guillemot", "California_Gull", "Glaucous_winged_Gull",
    "Heermann_Gull", "Herring_Gull", "Ivory_Gull", "Ring_billed_Gull", "Slaty_backed_Gull",
    "Western_Gull", "Anna_Hummingbird", "Ruby_throated_Hummingbird", "Rufous_Hummingbird",
    "Green_Violetear", "Long_tailed_Jaeger", "Pomarine_Jaeger", "Blue_Jay", "Florida_Jay",
    "Green_Jay", "Dark_eyed_Junco", "Tropical_Kingbird", "Gray_Kingbird", "Belted_Kingfisher",
    "Green_Kingfisher", "Pied_Kingfisher", "Ringed_Kingfisher", "White_breasted_Kingfisher",
    "Red_legged_Kittiwake", "Horned_Lark", "Pacific_Loon", "Mallard", "Western_Meadowlark",
    "Hooded_Merganser", "Red_breasted_Merganser", "Mockingbird", "Nighthawk", "Clark_Nutcracker",
    "White_breasted_Nuthatch", "Baltimore_Oriole", "Hooded_Oriole", "Orchard_Oriole",
    "Scott_Oriole", "Ovenbird", "Brown_Pelican", "White_Pelican", "Western_Wood_Pewee", "Sayornis",
    "American_Pipit", "Whip_poor_Will", "Horned_Puffin", "Common_Raven", "White_necked_Raven",
    "American_Redstart", "Geococcyx", "Loggerhead_Shrike", "Great_Grey_Shrike", "Baird_Sparrow",
    "Black_throated_Sparrow", "Brewer_Sparrow", "Chipping_Sparrow", "Clay_colored_Sparrow",
    "House_Sparrow", "Field_Sparrow", "Fox_Sparrow", "Grasshopper_Sparrow", "Harris_Sparrow",
    "Henslow_Sparrow", "Le_Conte_Sparrow", "Lincoln_Sparrow", "Nelson_Sharp_tailed_Sparrow",
    "Savannah_Sparrow", "Seaside_Sparrow", "Song_Sparrow", "Tree_Sparrow", "Vesper_Sparrow",
    "White_crowned_Sparrow", "White_throated_Sparrow", "Cape_Glossy_Starling", "Bank_Swallow",
    "Barn_Swallow", "Cliff_Swallow", "Tree_Swallow", "Scarlet_Tanager", "Summer_Tanager",
    "Artic_Tern", "Black_Tern", "Caspian_Tern", "Common_Tern", "Elegant_Tern", "Forsters_Tern",
    "Least_Tern", "Green_tailed_Towhee", "Brown_Thrasher", "Sage_Thrasher", "Black_capped_Vireo",
    "Blue_headed_Vireo", "Philadelphia_Vireo", "Red_eyed_Vireo", "Warbling_Vireo",
    "White_eyed_Vireo", "Yellow_throated_Vireo", "Bay_breasted_Warbler", "Black_and_white_Warbler",
    "Black_throated_Blue_Warbler", "Blue_winged_Warbler", "Canada_Warbler", "Cape_May_Warbler",
    "Cerulean_Warbler", "Chestnut_sided_Warbler", "Golden_winged_Warbler", "Hooded_Warbler",
    "Kentucky_Warbler", "Magnolia_Warbler", "Mourning_Warbler", "Myrtle_Warbler",
    "Nashville_Warbler", "Orange_crowned_Warbler", "Palm_Warbler", "Pine_Warbler",
    "Prairie_Warbler", "Prothonotary_Warbler", "Swainson_Warbler", "Tennessee_Warbler",
    "Wilson_Warbler", "Worm_eating_Warbler", "Yellow_Warbler", "Northern_Waterthrush",
    "Louisiana_Waterthrush", "Bohemian_Waxwing", "Cedar_Waxwing", "American_Three_toed_Woodpecker",
    "Pileated_Woodpecker", "Red_bellied_Woodpecker", "Red_cockaded_Woodpecker",
    "Red_headed_Woodpecker", "Downy_Woodpecker", "Bewick_Wren", "Cactus_Wren", "Carolina_Wren",
    "House_Wren", "Marsh_Wren", "Rock_Wren", "Winter_Wren", "Common_Yellowthroat",
)
# fmt: on


def prompt_names(names: Sequence[str], *, underscores_to_spaces: bool = True) -> tuple[str, ...]:
    """Names as they go into a prompt: `_` -> space (`"maple_tree"` -> `"maple tree"`), trimmed."""
    if not underscores_to_spaces:
        return tuple(names)
    return tuple(" ".join(name.replace("_", " ").split()) for name in names)


def wnids(table: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """The WordNet ids of an ImageNet `(wnid, name)` table, in label order."""
    return tuple(wnid for wnid, _ in table)


def names(table: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """The names of an ImageNet `(wnid, name)` table, in label order."""
    return tuple(name for _, name in table)


def synset_names(path: str) -> dict[str, str]:
    """Reads an ImageNet `LOC_synset_mapping.txt`-style file: `wnid name[, synonym...]` per line.

    Returns wnid -> first name (`"n01440764 tench, Tinca tinca"` -> `{"n01440764": "tench"}`).
    """
    mapping = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            wnid, _, rest = line.strip().partition(" ")
            if wnid:
                mapping[wnid] = rest.split(",")[0].strip() or wnid
    return mapping
