"""Every `--model`, in one place: the name a user types -> the class that builds it (SPEC 3, 3.1).

The reference's five (img_text_composition_models.py, their layout frozen so that its released
checkpoints load strictly), then the paper's other methods and TIRG's two ablations
(paper_composers.py).  The order is the one `--help` and retrieve.py show (results_table.py's
rows follow the paper's tables instead: results_table.PAPER_ORDER).  Both model modules stay
free of the registry: it imports them, never the other way round.
"""
import img_text_composition_models as itcm
import paper_composers

MODELS = {
    'imgonly': itcm.SimpleModelImageOnly,
    'textonly': itcm.SimpleModelTextOnly,
    'concat': itcm.Concat,
    'tirg': itcm.TIRG,
    'tirg_lastconv': itcm.TIRGLastConv,
    'show_and_tell': paper_composers.ShowAndTell,
    'param_hashing': paper_composers.ParamHashing,
    'relationship': paper_composers.Relationship,
    'film': paper_composers.FiLM,
    'attribute_operator': paper_composers.AttributeOperator,
    'tirg_gate_only': paper_composers.TIRGGateOnly,
    'tirg_res_only': paper_composers.TIRGResOnly,
}

# Models whose loss never reads some of their parameters (DistributedDataParallel must be told):
# the image-only model never reads its text encoder, nor does attribute_operator (the adjective
# picks the operator).
UNUSED_PARAMETERS = {'imgonly', 'attribute_operator'}
