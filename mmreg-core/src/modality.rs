//! The kinds of multimodal data a model can accept: [`Modality`], generated from the one list the
//! registration macros also read (`mmreg-macros`' `MODALITIES`), so the two never disagree.

mmreg_macros::__define_modalities!();
