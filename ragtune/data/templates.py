"""Wording for the synthetic benchmark: passage and question templates plus word lists.

Passage templates ({s} subject, {o} object) and question templates ({s}, or {a}/{b}
for comparisons) are written so that a question never shares a 3-word phrase
with its gold passages besides entity names: a retriever has to learn that
"came into the world in" answers "What is the birthplace of", not copy words.
"""

# relation -> (subject type, object type, asked in questions?)
RELATIONS = {
    "born_in": ("person", "city", True),
    "lives_in": ("person", "city", True),
    "works_for": ("person", "company", True),
    "birth_year": ("person", "year", True),
    "profession": ("person", "word", True),
    "studied_at": ("person", "university", True),
    "hobby": ("person", "word", False),
    "headquartered_in": ("company", "city", True),
    "company_founded": ("company", "year", True),
    "founded_by": ("company", "person", True),
    "product": ("company", "word", False),
    "located_in": ("city", "country", True),
    "landmark": ("city", "word", False),
    "campus_in": ("university", "city", True),
    "univ_founded": ("university", "year", True),
    "language": ("country", "word", False),
}

PASSAGE_TEMPLATES = {
    "born_in": [
        "{s} came into the world in {o}.",
        "{s} was delivered at a small clinic in {o}.",
        "Records show that {s} first drew breath in {o}.",
        "{o} is the town where {s} entered life.",
    ],
    "lives_in": [
        "{s} currently resides in {o}.",
        "{s} moved to {o} and has stayed there ever since.",
        "These days {s} keeps a home in {o}.",
        "{o} is where {s} lives at present.",
    ],
    "works_for": [
        "{s} is employed by {o}.",
        "{s} draws a salary from {o}.",
        "{s} has a job at {o}.",
        "On weekdays {s} reports to the offices of {o}.",
    ],
    "birth_year": ["{s} was born in {o}.", "The year {o} saw the arrival of {s}.", "{s}'s date of birth falls in {o}."],
    "profession": [
        "{s} earns a living as a {o}.",
        "By trade, {s} is a {o}.",
        "{s} has spent many years working as a {o}.",
    ],
    "studied_at": ["{s} graduated from {o}.", "{s} earned a degree at {o}.", "As a student, {s} attended {o}."],
    "hobby": ["In spare moments {s} enjoys {o}.", "{s} is a keen fan of {o}.", "Friends know {s} for a love of {o}."],
    "headquartered_in": [
        "{s} is headquartered in {o}.",
        "The main offices of {s} stand in {o}.",
        "{s} runs its operations out of {o}.",
    ],
    "company_founded": [
        "{s} was established in {o}.",
        "{s} opened for business in {o}.",
        "The history of {s} began in {o}.",
    ],
    "founded_by": [
        "{s} was set up by {o}.",
        "{o} started {s} from scratch.",
        "The firm {s} owes its existence to {o}.",
    ],
    "product": ["{s} manufactures {o}.", "{s} is best known for its {o}.", "Customers buy {o} from {s}."],
    "located_in": ["{s} lies within the borders of {o}.", "{s} is a city in {o}.", "The city of {s} belongs to {o}."],
    "landmark": [
        "{s} is famous for its {o}.",
        "Visitors to {s} often admire its {o}.",
        "The pride of {s} is an old {o}.",
    ],
    "campus_in": [
        "{s} has its campus in {o}.",
        "Students of {s} attend classes in {o}.",
        "{s} occupies several old buildings in {o}.",
    ],
    "univ_founded": [
        "{s} admitted its first students in {o}.",
        "{s} was chartered in {o}.",
        "The first lectures at {s} were given in {o}.",
    ],
    "language": [
        "Most people in {s} speak {o}.",
        "The official language of {s} is {o}.",
        "{o} is the main language heard in {s}.",
    ],
}

SINGLE_QUESTIONS = {
    "born_in": [
        "What is the birthplace of {s}?",
        "In which city was {s} born?",
        "Where was {s} born?",
        "Name the city of {s}'s birth.",
    ],
    "lives_in": [
        "Where does {s} live now?",
        "In which city is {s} living today?",
        "What is the current city of residence of {s}?",
        "Which city does {s} call home these days?",
    ],
    "works_for": [
        "Who is the employer of {s}?",
        "Which company does {s} work for?",
        "For which firm does {s} work?",
        "What organization pays {s}'s wages?",
    ],
    "birth_year": ["In what year was {s} born?", "What is the birth year of {s}?", "When was {s} born?"],
    "profession": ["What is {s}'s occupation?", "What does {s} do for a living?", "What line of work is {s} in?"],
    "studied_at": ["Which university did {s} go to?", "Where did {s} study?", "What is the alma mater of {s}?"],
    "headquartered_in": [
        "Where is {s} based?",
        "In which city does {s} have its head office?",
        "What city hosts the headquarters of {s}?",
    ],
    "company_founded": ["In what year was {s} founded?", "When did {s} start?", "What is the founding year of {s}?"],
    "founded_by": ["Who founded {s}?", "Who is the founder of {s}?", "Which person created {s}?"],
    "located_in": ["In which country is {s}?", "What country is {s} part of?", "Which nation does {s} belong to?"],
    "campus_in": ["Where is {s} located?", "In which city is {s}?", "What city is home to {s}?"],
    "univ_founded": ["When was {s} founded?", "In what year did {s} open?", "What year was {s} created?"],
}

# (first relation, second relation): the object of the first is the subject of the second
BRIDGE_QUESTIONS = {
    ("works_for", "headquartered_in"): [
        "In which city is the employer of {s} headquartered?",
        "Where is the company that employs {s} based?",
        "What city hosts the head office of {s}'s employer?",
    ],
    ("works_for", "company_founded"): [
        "In what year was the employer of {s} founded?",
        "When was the company {s} works for created?",
    ],
    ("works_for", "founded_by"): ["Who founded the company where {s} works?", "Who is the founder of {s}'s employer?"],
    ("born_in", "located_in"): ["In which country was {s} born?", "What country is the birthplace of {s} in?"],
    ("lives_in", "located_in"): ["In which country does {s} live now?", "What nation is {s}'s current home in?"],
    ("studied_at", "campus_in"): [
        "In which city did {s} attend university?",
        "Where is the university that {s} went to?",
    ],
    ("founded_by", "born_in"): [
        "Where was the founder of {s} born?",
        "In which city was the person who founded {s} born?",
    ],
    ("founded_by", "birth_year"): ["In what year was the founder of {s} born?", "When was the creator of {s} born?"],
    ("headquartered_in", "located_in"): ["In which country is {s} headquartered?", "What nation is {s} based in?"],
    ("campus_in", "located_in"): ["In which country is {s} located?", "What country is {s} in?"],
}

# name -> (relation compared, templates as (text, rule)); rule: "min"/"max" picks the
# entity with the smaller/larger value, "same" answers yes/no.
COMPARISONS = {
    "older_person": (
        "birth_year",
        [
            ("Who was born earlier, {a} or {b}?", "min"),
            ("Which of {a} and {b} is older?", "min"),
            ("Who is younger, {a} or {b}?", "max"),
            ("Of {a} and {b}, who was born later?", "max"),
        ],
    ),
    "older_company": (
        "company_founded",
        [
            ("Which company was founded first, {a} or {b}?", "min"),
            ("Which is older, {a} or {b}?", "min"),
            ("Which of {a} and {b} is the newer company?", "max"),
        ],
    ),
    "same_birthplace": (
        "born_in",
        [
            ("Were {a} and {b} born in the same city?", "same"),
            ("Do {a} and {b} share a birthplace?", "same"),
            ("Is {a}'s hometown the same as {b}'s?", "same"),
        ],
    ),
    "same_employer": (
        "works_for",
        [
            ("Do {a} and {b} work for the same company?", "same"),
            ("Are {a} and {b} colleagues at the same firm?", "same"),
            ("Is {a} employed at the same place as {b}?", "same"),
        ],
    ),
}

PROFESSIONS = [
    "clockmaker",
    "glassblower",
    "ferry pilot",
    "beekeeper",
    "cartographer",
    "stonemason",
    "tailor",
    "librarian",
    "surveyor",
    "pharmacist",
    "baker",
    "locksmith",
    "translator",
    "veterinarian",
    "bookbinder",
    "potter",
    "nurse",
    "carpenter",
    "geologist",
    "teacher",
    "journalist",
    "chemist",
]
HOBBIES = [
    "birdwatching",
    "chess",
    "pottery",
    "sailing",
    "kite flying",
    "rock climbing",
    "origami",
    "stargazing",
    "fencing",
    "beekeeping",
    "rowing",
    "calligraphy",
    "mushroom foraging",
    "model trains",
    "archery",
    "juggling",
]
PRODUCTS = [
    "ceramic valves",
    "folding bicycles",
    "weather balloons",
    "copper kettles",
    "garden robots",
    "solar lanterns",
    "rope bridges",
    "wool blankets",
    "pocket radios",
    "canal locks",
    "glass marbles",
    "paper lamps",
    "tin toys",
    "river barges",
    "sewing machines",
    "ink pens",
]
LANDMARKS = [
    "stone bridge",
    "clock tower",
    "lighthouse",
    "covered market",
    "windmill",
    "observatory",
    "opera house",
    "salt mine",
    "botanical garden",
    "aqueduct",
    "city wall",
    "cathedral",
    "harbour crane",
    "rope factory",
]
COMPANY_SUFFIXES = [
    "Works",
    "Holdings",
    "Labs",
    "Industries",
    "Group",
    "Trading",
    "Systems",
    "Foundry",
    "Logistics",
    "Mills",
]
UNIVERSITY_SUFFIXES = ["Institute", "College", "Academy", "University", "Polytechnic"]
