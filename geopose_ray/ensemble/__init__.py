"""Ensembling: member selection (`members`), blending and its OOF fit (`blend`, Ray-free), the Ray
Data inference job (`job`) and PNG previews (`preview`). Import the submodules you need; this
package imports nothing, so Ray-free users of `blend` never load Ray."""
