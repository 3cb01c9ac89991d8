"""Generated, rated emergency-department visits on one topic ("respiratory infections") for the
answer-quality benchmark on a real small language model.

Unlike ``synthetic`` (the tiny test model's pre-formatted prompts), these rows look like a raw
syndromic-surveillance export: the columns of the built-in template (``template.BUILTIN_SYNDROMIC``)
plus the rating columns, so ``dataset.load_dataset(path, mapping=MAPPING)`` builds their prompts the
way it does for a user's file. Every cell is generated from fixed vocabularies with a seeded
``random.Random``: no real patient data, and the same ``(n, seed, vocabulary)`` always gives the
same rows. Two vocabularies, ``"a"`` and ``"b"``, share no diagnosis code and no chief complaint
(different codes, phrasings, vital-sign and diagnosis formats, ambiguous presentations), so a
model trained on one and tested on the other meets new kinds of records. Both follow one rule:

- Match (1): the discharge diagnosis names a respiratory infection, whatever else the record says
  or denies; or it codes a cough with a documented fever.
- Does Not Match (0): the diagnosis is an unrelated condition and the record shows no respiratory
  symptom (none mentioned, or denied: "denies fever or cough", "no SOB", "neg for flu").
- Unknown (-1): respiratory symptoms with a missing, pending or nonspecific diagnosis that a
  respiratory infection could explain but does not confirm (chest pain with cough, fever alone,
  "r/o pneumonia", an asthma flare, left without being seen), or an injury diagnosis beside a
  documented cough and fever.

Each row carries a one-sentence rationale stating the rule it applies. ``noise`` changes a share of
the labels the way a second reviewer would disagree (mostly one step, to or from Unknown), with a
rationale for the new label. Standard library only (``csvfile.csv_text`` and ``fsutil.write_text``
are too); the one I/O is ``write_csv``, atomic like every file the product writes.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from ..fsutil import write_text
from .csvfile import csv_text

MAPPING = {"Match": 1, "Does Not Match": 0, "Unknown": -1}
# The rule above in the words an expert group would write it down (a job's topic_definition).
TOPIC_DEFINITION = (
    "Match: the discharge diagnosis names a respiratory infection (influenza, pneumonia, bronchitis, "
    "sinusitis, pharyngitis, an upper respiratory infection, COVID-19, RSV, ...), whatever else the record "
    "says or denies; or it codes a cough together with a documented fever.\n"
    "Does Not Match: the diagnosis is an unrelated condition and the record shows no respiratory symptom "
    "(none mentioned, or denied).\n"
    "Unknown: respiratory symptoms with a missing, pending or nonspecific diagnosis that a respiratory "
    "infection could explain but does not confirm (chest pain with cough, fever alone, rule-out pneumonia, "
    "an asthma flare, left without being seen), or an injury diagnosis beside a documented cough and fever.")
MATCH, NO_MATCH, UNKNOWN = 1, 0, -1
ID_COLUMN = "C_BioSense_ID"
DIAGNOSIS_COLUMN = "DischargeDiagnosis"
COMPLAINT_COLUMN = "ChiefComplaintOrig"
TRIAGE_COLUMN = "TriageNotes"
LABEL_COLUMN = "Expert Rating"
RATING_COLUMN = "Standardized_Rating"
RATIONALE_COLUMN = "Rationale_of_Rating"
HEADER = (ID_COLUMN, "Age", "Sex", COMPLAINT_COLUMN, TRIAGE_COLUMN, DIAGNOSIS_COLUMN,
          LABEL_COLUMN, RATING_COLUMN, RATIONALE_COLUMN)
VOCABULARY_NAMES = ("a", "b")

_LABELS = {value: label for label, value in MAPPING.items()}


@dataclass(frozen=True)
class Dx:
    """One ICD-10-CM code: the code, its description and the short name a rationale uses."""

    code: str
    description: str
    short: str


@dataclass(frozen=True)
class Negation:
    """A negated finding as written in a record, and the clause a rationale uses for it."""

    text: str
    denied: str  # "fever and cough are denied"


@dataclass(frozen=True)
class Scenario:
    """One kind of visit: its label, the diagnoses it is coded with (none: no diagnosis recorded),
    chief complaints, triage details (``{d}``: days), fever (True, False or None: either), the
    negations it may carry and the rationale with and without one."""

    label: int
    dx: tuple[Dx, ...]
    complaints: tuple[str, ...]
    details: tuple[str, ...]
    why: str  # {code} and {short} of the diagnosis
    fever: bool | None = None
    negations: tuple[Negation, ...] = ()
    negation_share: float = 0.0
    why_negated: str = ""  # also {denied}
    ages: tuple[int, int] = (18, 92)
    spo2: tuple[int, int] = (95, 100)


@dataclass(frozen=True)
class Vocabulary:
    """Everything one vocabulary draws from, and how it writes sex, vitals and diagnoses."""

    name: str
    site: str
    scenarios: tuple[Scenario, ...]
    negations: tuple[Negation, ...]  # every negation its scenarios use
    comorbidities: tuple[Dx, ...]  # secondary codes of older patients; never respiratory
    sexes: tuple[str, ...]
    dx_format: str  # "{code} {description}" or "{description} ({code})"
    dx_separator: str
    vitals: str  # {temp_c} or {temp_f}, {hr}, {rr}, {spo2}
    adult_openers: tuple[str, ...]
    child_openers: tuple[str, ...]
    sentences: bool = False  # triage details start with a capital letter (else terse lower case)

    def codes(self) -> set[str]:
        """Every diagnosis code the vocabulary can write."""
        return {dx.code for s in self.scenarios for dx in s.dx} | {dx.code for dx in self.comorbidities}

    def complaints(self) -> set[str]:
        """Every chief complaint phrase before a negation is appended."""
        return {c for s in self.scenarios for c in s.complaints}


# --- vocabulary "a": adult ED, terse triage shorthand, Celsius vitals, "CODE Description;" -------

_A_NEG_RESP = (
    Negation("denies fever or cough", "fever and cough are denied"),
    Negation("no SOB", "shortness of breath is denied"),
    Negation("neg for flu", "the flu test is negative"),
    Negation("no cough/congestion", "cough and congestion are denied"),
    Negation("denies URI sx", "upper respiratory symptoms are denied"),
)
_A_NO_COUGH = Negation("denies cough", "cough is denied")
_A_NO_FEVER = Negation("afebrile at home, denies chills", "fever and chills are denied")

_A_INFECTION = "Discharge diagnosis {code} ({short}) is a respiratory infection."
_A_INFECTION_NEG = "Discharge diagnosis {code} ({short}) is a respiratory infection even though {denied}."
_A_UNRELATED = "No respiratory symptom is documented and {short} ({code}) is unrelated to a respiratory infection."
_A_UNRELATED_NEG = "{Denied}; {short} ({code}) is unrelated to a respiratory infection."


def _unrelated(dx: Dx, complaints: tuple[str, ...], details: tuple[str, ...], negations: tuple[Negation, ...],
               why: str, why_negated: str, **kw) -> Scenario:
    return Scenario(NO_MATCH, (dx,), complaints, details, why, negations=negations, negation_share=0.55,
                    why_negated=why_negated, **kw)


_A_SCENARIOS = (
    Scenario(MATCH, (Dx("J06.9", "Acute upper respiratory infection, unspecified", "upper respiratory infection"),),
             ("URI sx x3d", "runny nose, cough", "congestion/ cough", "cold sx, ST", "c/o cought and congestion"),
             ("nasal congestion and dry cough x{d}d", "rhinorrhea, mild ST, no distress",
              "sick contacts at home, cough x{d}d"),
             _A_INFECTION, negations=(_A_NO_FEVER,), negation_share=0.3, why_negated=_A_INFECTION_NEG, ages=(18, 75)),
    Scenario(MATCH, (Dx("J18.9", "Pneumonia, unspecified organism", "pneumonia"),),
             ("SOB, cough", "cough w/ green sputum", "diffculty breathing", "feaver and cough", "fever, prod cough x5d",
              "weak, SOB, cough"),
             ("crackles R base per triage RN", "productive cough, pleuritic pain w/ deep breath",
              "CXR ordered from triage, cough x{d}d"),
             _A_INFECTION, fever=True, ages=(35, 95), spo2=(87, 94)),
    Scenario(MATCH, (Dx("J20.9", "Acute bronchitis, unspecified", "acute bronchitis"),),
             ("cough x1wk", "chest congestion, cough", "cough keeping pt up at night", "cought x10d"),
             ("dry hacking cough x{d}d, worse at night", "coughing fits w/ post-tussive emesis",
              "wheezy cough, hx smoker"),
             _A_INFECTION, negations=(_A_NO_FEVER,), negation_share=0.4, why_negated=_A_INFECTION_NEG),
    Scenario(MATCH, (Dx("J02.9", "Acute pharyngitis, unspecified", "pharyngitis"),),
             ("sore throat x2d", "ST, feaver", "sore throught", "painful swallowing"),
             ("throat pain x{d}d, tolerating PO", "b/l tonsillar erythema noted", "hoarse voice, ST x{d}d"),
             _A_INFECTION, negations=(_A_NO_COUGH,), negation_share=0.5, why_negated=_A_INFECTION_NEG, ages=(18, 60)),
    Scenario(MATCH, (Dx("J10.1", "Influenza due to other identified influenza virus with other respiratory "
                              "manifestations", "influenza"),),
             ("flu like sx", "body aches, cough, chills", "fever, myalgias", "pos flu A at UC"),
             ("abrupt onset fever, myalgias, cough x{d}d", "rapid flu A pos at urgent care", "household flu contacts"),
             _A_INFECTION, fever=True),
    Scenario(MATCH, (Dx("U07.1", "COVID-19", "COVID-19"),),
             ("pos covid home test", "covid +, SOB", "loss of taste/smell, cough", "fever, cough, covid exposure"),
             ("pos home antigen test x{d}d ago", "cough and fatigue, coworker covid +", "anosmia x{d}d"),
             _A_INFECTION, spo2=(90, 99)),
    Scenario(MATCH, (Dx("J01.90", "Acute sinusitis, unspecified", "acute sinusitis"),),
             ("sinus pressure", "facial pain, congestion x10d", "sinus HA w/ nasal drainage"),
             ("purulent nasal drainage x{d}d", "maxillary tenderness, congestion"),
             _A_INFECTION, negations=(_A_NO_COUGH,), negation_share=0.3, why_negated=_A_INFECTION_NEG),
    Scenario(MATCH, (Dx("R05.9", "Cough, unspecified", "cough"),),
             ("c/o cough", "cough, feaver", "persistent cough"),
             ("cough x{d}d, febrile at home", "tmax 38.9 at home, cough x{d}d"),
             "Discharge diagnosis {code} ({short}) with a documented fever points to an acute respiratory infection.",
             fever=True),
    _unrelated(Dx("S93.401A", "Sprain of unspecified ligament of right ankle, initial encounter", "ankle sprain"),
               ("R ankle pain after fall", "twisted ankle", "ankle injury playing bball"),
               ("rolled R ankle stepping off curb", "swelling lat malleolus, able to bear wt"),
               _A_NEG_RESP, _A_UNRELATED, _A_UNRELATED_NEG, fever=False, ages=(12, 70)),
    _unrelated(Dx("K35.80", "Unspecified acute appendicitis", "appendicitis"),
               ("RLQ abd pain", "abd pain, vomiting x1d"),
               ("periumbilical pain migrating to RLQ", "anorexia, nausea, RLQ tenderness"),
               _A_NEG_RESP, _A_UNRELATED, _A_UNRELATED_NEG, ages=(8, 60)),
    _unrelated(Dx("N39.0", "Urinary tract infection, site not specified", "urinary tract infection"),
               ("dysuria", "burning w/ urination, freq", "UTI sx"),
               ("dysuria and frequency x{d}d", "suprapubic pain, cloudy urine"),
               _A_NEG_RESP, _A_UNRELATED, _A_UNRELATED_NEG),
    _unrelated(Dx("I21.9", "Acute myocardial infarction, unspecified", "myocardial infarction"),
               ("CP radiating to L arm", "chest pressure, diaphoretic"),
               ("substernal pressure, onset at rest", "STEMI alert called from triage"),
               _A_NEG_RESP, _A_UNRELATED, _A_UNRELATED_NEG, fever=False, ages=(40, 95)),
    _unrelated(Dx("R10.9", "Unspecified abdominal pain", "abdominal pain"),
               ("abd pain", "stomach pain since last night"),
               ("diffuse abd pain, no vomiting", "crampy abd pain x{d}d"),
               _A_NEG_RESP, _A_UNRELATED, _A_UNRELATED_NEG, fever=False),
    _unrelated(Dx("M54.50", "Low back pain, unspecified", "low back pain"),
               ("low back pain", "LBP after lifting"),
               ("back pain after lifting boxes at work", "chronic LBP flare, no saddle anesthesia"),
               _A_NEG_RESP, _A_UNRELATED, _A_UNRELATED_NEG, fever=False),
    _unrelated(Dx("S61.411A", "Laceration without foreign body of right hand, initial encounter", "hand laceration"),
               ("lac to R hand", "cut hand on glass"),
               ("2 cm lac R palm, bleeding controlled", "cut hand w/ kitchen knife"),
               _A_NEG_RESP, _A_UNRELATED, _A_UNRELATED_NEG, fever=False),
    _unrelated(Dx("G43.909", "Migraine, unspecified, not intractable, without status migrainosus", "migraine"),
               ("HA, photophobia", "migraine"),
               ("throbbing HA x{d}d, hx migraines", "HA w/ nausea, photophobia"),
               _A_NEG_RESP, _A_UNRELATED, _A_UNRELATED_NEG, fever=False),
    _unrelated(Dx("K08.89", "Other specified disorders of teeth and supporting structures", "dental pain"),
               ("tooth pain", "dental pain L lower"),
               ("L lower molar pain x{d}d", "broken tooth, no facial swelling"),
               _A_NEG_RESP, _A_UNRELATED, _A_UNRELATED_NEG, fever=False),
    Scenario(UNKNOWN, (Dx("R07.9", "Chest pain, unspecified", "chest pain"),),
             ("CP w/ cough", "chest pain, cough x2d", "L sided CP worse w/ cough"),
             ("CP worse w/ cough and deep breath", "sharp CP, dry cough x{d}d"),
             "Chest pain with cough but only the nonspecific diagnosis {code} ({short}) neither confirms nor rules "
             "out a respiratory infection.", ages=(25, 85)),
    Scenario(UNKNOWN, (Dx("R50.9", "Fever, unspecified", "fever"),),
             ("feaver", "fever", "fever x2d, no other complaints"),
             ("fever x{d}d, no localizing sx", "tmax 39.2 at home, source unclear"),
             "Fever alone with diagnosis {code} ({short}) does not show whether the infection is respiratory.",
             fever=True),
    Scenario(UNKNOWN, (Dx("Z03.89", "Encounter for observation for other suspected diseases and conditions ruled out",
                          "observation, ruled out"),),
             ("r/o pneumonia", "r/o PNA per PCP", "abnl CXR, r/o pna"),
             ("sent by PCP for CXR, mild cough", "r/o PNA, CXR read pending at dispo"),
             "Pneumonia was only being ruled out ({code}) and no final diagnosis confirms a respiratory infection."),
    Scenario(UNKNOWN, (Dx("R53.83", "Other fatigue", "fatigue"),),
             ("fatigue, mild congestion", "tired x1wk, runny nose"),
             ("generalized fatigue x{d}d, mild nasal congestion", "low energy, sniffles"),
             "Fatigue ({code}) with mild congestion is too nonspecific to call a respiratory infection.",
             fever=False),
)

# --- vocabulary "b": families and children, lay phrasing, Fahrenheit, "Description (CODE)" --------

_B_NEG_RESP = (
    Negation("no coughing or fever", "coughing and fever are denied"),
    Negation("breathing fine per pt", "breathing problems are denied"),
    Negation("flu/COVID swab negative", "the flu and COVID swab is negative"),
    Negation("no runny nose or sore throat", "runny nose and sore throat are denied"),
    Negation("denies SOB/wheezing", "shortness of breath and wheezing are denied"),
)
_B_NOT_COUGHING = Negation("not coughing", "coughing is denied")
_B_NO_FEVER = Negation("no fever at home", "fever at home is denied")

_B_INFECTION = "The discharge diagnosis {short} ({code}) is a respiratory infection."
_B_INFECTION_NEG = "The discharge diagnosis {short} ({code}) is a respiratory infection although {denied}."
_B_UNRELATED = "The record shows no respiratory symptom, and {short} ({code}) is not a respiratory infection."
_B_UNRELATED_NEG = "{Denied}, and {short} ({code}) is not a respiratory infection."

_B_SCENARIOS = (
    Scenario(MATCH, (Dx("J11.1", "Influenza due to unidentified influenza virus with other respiratory manifestations",
                        "influenza"),),
             ("flu symptoms", "achy all over w/ coughing", "fever 102 and chills", "flu exposure, now feverish"),
             ("whole family sick w/ flu this wk", "body aches and coughing for {d} days"),
             _B_INFECTION, fever=True, ages=(3, 88)),
    Scenario(MATCH, (Dx("J21.0", "Acute bronchiolitis due to respiratory syncytial virus", "RSV bronchiolitis"),),
             ("wheazing, runny nose", "fast breathing", "poor feeding, coughing", "RSV + at daycare"),
             ("retractions noted, nasal flaring", "daycare RSV outbreak, congested for {d} days"),
             _B_INFECTION, ages=(0, 2), spo2=(89, 97)),
    Scenario(MATCH, (Dx("J15.9", "Unspecified bacterial pneumonia", "bacterial pneumonia"),),
             ("productive cough, chills", "coughing up yellow phlegm", "short of breath w/ fever",
              "chest congestoin, fever"),
             ("rhonchi on L, coughing up yellow phlegm", "pt winded walking from car, sick for {d} days"),
             _B_INFECTION, fever=True, ages=(40, 95), spo2=(86, 94)),
    Scenario(MATCH, (Dx("J03.90", "Acute tonsillitis, unspecified", "tonsillitis"),),
             ("throat hurts", "trouble swallowing, fever", "swollen tonsils"),
             ("tonsils enlarged w/ exudate b/l", "no drooling, throat pain for {d} days"),
             _B_INFECTION, negations=(_B_NOT_COUGHING,), negation_share=0.5, why_negated=_B_INFECTION_NEG,
             ages=(4, 30)),
    Scenario(MATCH, (Dx("J02.0", "Streptococcal pharyngitis", "strep throat"),),
             ("strep exposure, throat pain", "pos rapid strep", "throat pain w/ swollen glands"),
             ("sibling tested pos for strep", "rapid strep positive in triage"),
             _B_INFECTION, negations=(_B_NOT_COUGHING,), negation_share=0.5, why_negated=_B_INFECTION_NEG,
             ages=(3, 25)),
    Scenario(MATCH, (Dx("J12.89", "Other viral pneumonia", "viral pneumonia"),),
             ("hypoxic, coughing", "low O2 at home, cough", "worsening SOB after cold"),
             ("home pulse ox in high 80s", "cold for {d} days, now winded"),
             _B_INFECTION, ages=(30, 95), spo2=(85, 93)),
    Scenario(MATCH, (Dx("J00", "Acute nasopharyngitis [common cold]", "common cold"),),
             ("stuffy nose", "sneezing, nasal congestin", "runny nose x4 days"),
             ("clear runny nose, eating and drinking ok", "stuffy for {d} days"),
             _B_INFECTION, negations=(_B_NO_FEVER,), negation_share=0.4, why_negated=_B_INFECTION_NEG, ages=(0, 60)),
    Scenario(MATCH, (Dx("J05.0", "Acute obstructive laryngitis [croup]", "croup"),),
             ("barky cough", "noisy breathing at night", "stridor, hoarse cry"),
             ("seal-like cough started at night", "inspiratory stridor when upset"),
             _B_INFECTION, ages=(0, 5)),
    Scenario(MATCH, (Dx("J40", "Bronchitis, not specified as acute or chronic", "bronchitis"),),
             ("coughing for 2 wks", "chest cold"),
             ("chest cold hanging on for {d} days", "coughing at night, keeps family up"),
             _B_INFECTION, negations=(_B_NO_FEVER,), negation_share=0.4, why_negated=_B_INFECTION_NEG),
    Scenario(MATCH, (Dx("R05.1", "Acute cough", "acute cough"),),
             ("coughing", "coughing w/ temprature", "new cough"),
             ("temp 101.4 at home, coughing for {d} days", "fever and coughing since the weekend"),
             "The discharge diagnosis {short} ({code}) with a documented fever points to an acute respiratory "
             "infection.", fever=True),
    _unrelated(Dx("S52.501A", "Unspecified fracture of the lower end of right radius, initial encounter",
                  "wrist fracture"),
               ("FOOSH, R wrist pain", "wrist deformity after fall"),
               ("fell off scooter onto outstretched hand", "R wrist swollen, cap refill < 2 sec"),
               _B_NEG_RESP, _B_UNRELATED, _B_UNRELATED_NEG, fever=False, ages=(5, 90)),
    _unrelated(Dx("N20.0", "Calculus of kidney", "kidney stone"),
               ("flank pain, hx stones", "L flank pain w/ hematuria"),
               ("colicky L flank pain radiating to groin", "hx kidney stones, pain started this am"),
               _B_NEG_RESP, _B_UNRELATED, _B_UNRELATED_NEG, fever=False),
    _unrelated(Dx("K80.20", "Calculus of gallbladder without cholecystitis without obstruction", "gallstones"),
               ("RUQ pain after fatty meal", "upper abd pain, nausea"),
               ("RUQ pain after dinner out", "pain under R ribs for {d} days"),
               _B_NEG_RESP, _B_UNRELATED, _B_UNRELATED_NEG, fever=False, ages=(20, 85)),
    _unrelated(Dx("L03.116", "Cellulitis of left lower limb", "leg cellulitis"),
               ("L leg redness/swelling", "red warm leg"),
               ("spreading redness L shin, marked w/ pen", "scratch on L leg a week ago, now red and hot"),
               _B_NEG_RESP, _B_UNRELATED, _B_UNRELATED_NEG),
    _unrelated(Dx("R55", "Syncope and collapse", "syncope"),
               ("passed out at church", "syncopal episode"),
               ("witnessed LOC < 1 min, no injury", "got lightheaded standing up, then fainted"),
               _B_NEG_RESP, _B_UNRELATED, _B_UNRELATED_NEG, fever=False),
    _unrelated(Dx("F41.9", "Anxiety disorder, unspecified", "anxiety"),
               ("panic attack", "anxious, heart racing"),
               ("hx anxiety, stressful week at work", "heart racing and shaky, now calmer"),
               _B_NEG_RESP, _B_UNRELATED, _B_UNRELATED_NEG, fever=False, ages=(14, 70)),
    _unrelated(Dx("A08.4", "Viral intestinal infection, unspecified", "viral gastroenteritis"),
               ("vomiting and diarrhea", "V/D x2 days"),
               ("vomiting and diarrhea for {d} days, sick contacts", "can't keep fluids down since yesterday"),
               _B_NEG_RESP, _B_UNRELATED, _B_UNRELATED_NEG, ages=(1, 80)),
    _unrelated(Dx("T78.40XA", "Allergy, unspecified, initial encounter", "allergic reaction"),
               ("hives after new med", "itchy rash, lip swelling"),
               ("started amoxicillin 2 days ago, now hives", "lip swelling, no tongue swelling"),
               _B_NEG_RESP, _B_UNRELATED, _B_UNRELATED_NEG, fever=False),
    _unrelated(Dx("S01.81XA", "Laceration without foreign body of other part of head, initial encounter",
                  "head laceration"),
               ("head lac", "cut on forehead from fall"),
               ("hit head on coffee table, no LOC", "2 cm forehead lac, bleeding controlled"),
               _B_NEG_RESP, _B_UNRELATED, _B_UNRELATED_NEG, fever=False, ages=(1, 90)),
    _unrelated(Dx("H10.9", "Unspecified conjunctivitis", "conjunctivitis"),
               ("pink eye", "red itchy eyes b/l"),
               ("crusty eyes in the morning for {d} days", "red eyes b/l, classmates w/ pink eye"),
               _B_NEG_RESP, _B_UNRELATED, _B_UNRELATED_NEG, ages=(1, 60)),
    Scenario(UNKNOWN, (Dx("J45.901", "Unspecified asthma with (acute) exacerbation", "asthma exacerbation"),),
             ("asthma flare", "wheezing, hx asthma", "out of albuterol, tight chest"),
             ("using inhaler q2h today", "wheezing since the weather changed"),
             "An asthma exacerbation ({code}) may or may not be set off by an infection, so the record cannot decide.",
             ages=(4, 70), spo2=(90, 97)),
    Scenario(UNKNOWN, (Dx("R04.2", "Hemoptysis", "hemoptysis"),),
             ("coughing up blood", "blood streaked sputum"),
             ("streaks of blood when coughing for {d} days", "hx smoker, coughed up blood this am"),
             "Hemoptysis ({code}) with a cough has infectious and other causes, so the record cannot decide.",
             ages=(30, 90)),
    Scenario(UNKNOWN, (Dx("R68.83", "Chills (without fever)", "chills"),),
             ("chills and body aches", "shaking chills, no thermometer"),
             ("felt feverish but never checked temp", "chills for {d} days, mild cough"),
             "Chills ({code}) and aches without a measured fever or respiratory diagnosis are too nonspecific "
             "to decide.", fever=False),
    Scenario(UNKNOWN, (Dx("R06.00", "Dyspnea, unspecified", "dyspnea"),),
             ("SOB on exertion, hx CHF", "breathing harder lately, hx COPD"),
             ("winded after one flight of stairs", "more short of breath for {d} days, ankles swollen"),
             "Dyspnea ({code}) in a patient with heart or lung disease need not be an infection, so the record "
             "cannot decide.", ages=(55, 95), spo2=(90, 96)),
    Scenario(UNKNOWN, (),
             ("coughing, congestoin", "cold symptoms x3d", "feeling sick w/ cough"),
             ("pt left before provider eval (LWBS)", "LWBS after triage, coughing in waiting room"),
             "The patient left without being seen and no discharge diagnosis confirms or rules out a respiratory "
             "infection."),
    Scenario(UNKNOWN, (Dx("S20.211A", "Contusion of right front wall of thorax, initial encounter",
                          "chest wall contusion"),),
             ("rib pain after fall, coughing", "chest wall pain worse w/ coughing"),
             ("slipped on ice, R ribs sore, also coughing for {d} days", "rib pain, has had a cough and fever"),
             "A chest wall contusion ({code}) is an injury, but the documented cough and fever leave a respiratory "
             "infection open.", fever=True),
)

VOCABULARIES = {
    "a": Vocabulary(
        name="a", site="SYNA", scenarios=_A_SCENARIOS, negations=_A_NEG_RESP + (_A_NO_COUGH, _A_NO_FEVER),
        comorbidities=(Dx("I10", "Essential (primary) hypertension", "hypertension"),
                       Dx("E11.9", "Type 2 diabetes mellitus without complications", "type 2 diabetes"),
                       Dx("F17.210", "Nicotine dependence, cigarettes, uncomplicated", "nicotine dependence")),
        sexes=("M", "F"), dx_format="{code} {description}", dx_separator=";",
        vitals="T {temp_c:.1f}C HR {hr} RR {rr} SpO2 {spo2}% RA",
        adult_openers=("pt c/o", "pt reports", "per EMS,", "walk-in,"),
        child_openers=("per parent, pt w/", "mother states pt has")),
    "b": Vocabulary(
        name="b", site="SYNB", scenarios=_B_SCENARIOS, negations=_B_NEG_RESP + (_B_NOT_COUGHING, _B_NO_FEVER),
        comorbidities=(Dx("E78.5", "Hyperlipidemia, unspecified", "hyperlipidemia"),
                       Dx("Z87.891", "Personal history of nicotine dependence", "former smoker"),
                       Dx("E66.9", "Obesity, unspecified", "obesity")),
        sexes=("Male", "Female"), dx_format="{description} ({code})", dx_separator="; ",
        vitals="Temp {temp_f:.1f}F, P {hr}, R {rr}, O2 sat {spo2}% on room air",
        adult_openers=("Pt states", "Pt here for", "Brought in by family for", "Pt here tonight for"),
        child_openers=("Mom says", "Dad reports", "Per parent,"), sentences=True),
}

# How a second reviewer moves each label: (new label, weight). Mostly one step, to or from Unknown.
_SECOND_REVIEW = {MATCH: ((UNKNOWN, 7), (NO_MATCH, 3)), NO_MATCH: ((UNKNOWN, 7), (MATCH, 3)),
                  UNKNOWN: ((MATCH, 1), (NO_MATCH, 1))}
_SECOND_REVIEW_WHY = {
    (MATCH, UNKNOWN): "On second review the record was judged too thin to confirm a respiratory infection, "
                      "so it is rated Unknown.",
    (MATCH, NO_MATCH): "On second review the diagnosis was not counted as a respiratory infection, so the visit "
                       "does not match.",
    (NO_MATCH, UNKNOWN): "On second review a respiratory cause of the visit could not be ruled out, so it is "
                         "rated Unknown.",
    (NO_MATCH, MATCH): "On second review the presentation was read as a possible respiratory infection, so it "
                       "is rated a match.",
    (UNKNOWN, MATCH): "On second review the respiratory symptoms were taken as enough for a respiratory "
                      "infection, so it is rated a match.",
    (UNKNOWN, NO_MATCH): "On second review, without a respiratory infection diagnosis, the visit was ruled out as "
                         "not matching.",
}


def label_counts(n: int, unknown_share: float) -> dict[int, int]:
    """How many rows of each rating ``generate_visits`` writes before noise: ``round(n *
    unknown_share)`` Unknown, the rest split between Match and Does Not Match (Match gets the odd one)."""
    unknown = round(n * unknown_share)
    match = (n - unknown + 1) // 2
    return {MATCH: match, NO_MATCH: n - unknown - match, UNKNOWN: unknown}


def noisy_count(n: int, noise: float) -> int:
    """How many labels ``noise`` changes: ``round(n * noise)``."""
    return round(n * noise)


def _temperature_c(rng: random.Random, fever: bool | None) -> float:
    if fever is None:
        fever = rng.random() < 0.5
    return rng.uniform(38.1, 40.2) if fever else rng.uniform(36.3, 37.6)


def _vitals(rng: random.Random, vocab: Vocabulary, scenario: Scenario, age: int, fever: bool | None) -> str:
    temp_c = round(_temperature_c(rng, fever), 1)
    febrile = temp_c >= 38.0
    hr = rng.randint(95, 130) if febrile else rng.randint(62, 100)
    rr = rng.randint(14, 24)
    if age < 3:  # infants breathe and beat faster
        hr, rr = hr + 30, rr + 16
    return vocab.vitals.format(temp_c=temp_c, temp_f=temp_c * 9 / 5 + 32, hr=hr, rr=rr,
                               spo2=rng.randint(*scenario.spo2))


def _diagnosis(rng: random.Random, vocab: Vocabulary, scenario: Scenario, age: int) -> tuple[str, Dx | None]:
    """The diagnosis cell and its primary code (None when no diagnosis was recorded)."""
    if not scenario.dx:
        return "", None
    primary = rng.choice(scenario.dx)
    codes = [primary]
    if age >= 40 and rng.random() < 0.35:
        codes.append(rng.choice(vocab.comorbidities))
    text = vocab.dx_separator.join(vocab.dx_format.format(code=d.code, description=d.description) for d in codes)
    return text, primary


def _visit(rng: random.Random, vocab: Vocabulary, scenario: Scenario, index: int) -> dict[str, str]:
    age = rng.randint(*scenario.ages)
    sex = rng.choice(vocab.sexes)
    complaint = rng.choice(scenario.complaints)
    detail = rng.choice(scenario.details).format(d=rng.randint(1, 10))
    if vocab.sentences:
        detail = detail[0].upper() + detail[1:]
    negation = (rng.choice(scenario.negations)
                if scenario.negations and rng.random() < scenario.negation_share else None)
    in_complaint = negation is not None and rng.random() < 0.4
    openers = vocab.child_openers if age < 13 else vocab.adult_openers
    note = f"{rng.choice(openers)} {complaint}. {detail}."
    if in_complaint:
        complaint = f"{complaint}, {negation.text}"
    elif negation is not None:
        note += f" {negation.text[0].upper()}{negation.text[1:]}."
    # a record that denies fever shows a normal temperature
    fever = False if negation is not None and "fever" in negation.denied else scenario.fever
    note += " " + _vitals(rng, vocab, scenario, age, fever)
    diagnosis, primary = _diagnosis(rng, vocab, scenario, age)
    why = scenario.why_negated if negation is not None else scenario.why
    fields = {"code": primary.code if primary else "", "short": primary.short if primary else ""}
    if negation is not None:
        fields.update(denied=negation.denied, Denied=negation.denied[0].upper() + negation.denied[1:])
    return {
        ID_COLUMN: f"2024.{rng.randint(1, 12):02d}.{rng.randint(1, 28):02d}.{vocab.site}_{index + 1:07d}",
        "Age": str(age),
        "Sex": sex,
        COMPLAINT_COLUMN: complaint,
        TRIAGE_COLUMN: note,
        DIAGNOSIS_COLUMN: diagnosis,
        LABEL_COLUMN: _LABELS[scenario.label],
        RATING_COLUMN: str(scenario.label),
        RATIONALE_COLUMN: why.format(**fields),
    }


def _second_review(rows: list[dict[str, str]], noise: float, seed: int, vocabulary: str) -> None:
    """Change ``noisy_count(len(rows), noise)`` labels in place, as a second reviewer would. A
    generator of its own keeps the rows themselves the same whatever the noise."""
    rng = random.Random(f"visits-second-review-{vocabulary}-{seed}")
    for i in sorted(rng.sample(range(len(rows)), noisy_count(len(rows), noise))):
        old = int(rows[i][RATING_COLUMN])
        choices, weights = zip(*_SECOND_REVIEW[old])
        new = rng.choices(choices, weights)[0]
        rows[i].update({LABEL_COLUMN: _LABELS[new], RATING_COLUMN: str(new),
                        RATIONALE_COLUMN: _SECOND_REVIEW_WHY[(old, new)]})


def generate_visits(n: int, *, seed: int, vocabulary: str = "a", unknown_share: float = 0.1,
                    noise: float = 0.0) -> list[dict[str, str]]:
    """``n`` rated visits as dicts keyed by ``HEADER``, every value a string. The rating counts are
    ``label_counts(n, unknown_share)`` in shuffled order; then ``noisy_count(n, noise)`` labels are
    changed by a second reviewer. The same arguments always give the same rows."""
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary must be one of {', '.join(VOCABULARY_NAMES)}")
    if not isinstance(n, int) or n < 0:
        raise ValueError("n must be a non-negative integer")
    for name, share in (("unknown_share", unknown_share), ("noise", noise)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1")
    vocab = VOCABULARIES[vocabulary]
    rng = random.Random(f"visits-{vocabulary}-{seed}")
    labels = [label for label, count in label_counts(n, unknown_share).items() for _ in range(count)]
    rng.shuffle(labels)
    by_label = {label: [s for s in vocab.scenarios if s.label == label] for label in MAPPING.values()}
    rows = [_visit(rng, vocab, rng.choice(by_label[label]), i) for i, label in enumerate(labels)]
    if noise:
        _second_review(rows, noise, seed, vocabulary)
    return rows


def write_csv(path: str | os.PathLike, rows: list[dict[str, str]]) -> str:
    """Write ``rows`` (from ``generate_visits``) as a CSV file with ``HEADER``, atomically, the way
    the product writes every CSV cell; returns the path as a string."""
    write_text(path, csv_text([HEADER, *([row[c] for c in HEADER] for row in rows)]))
    return str(path)
