// MathJax 2.7 settings, read by mathjax/MathJax.js (served with the site, no CDN) when it loads.
// pymdownx.arithmatex (generic mode) wraps math in elements of class "arithmatex" holding
// \( \) (inline) or \[ \] (display); only those elements are typeset.
window.MathJax = {
  tex2jax: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processClass: "arithmatex",
    ignoreClass: ".*|",
  },
  TeX: { extensions: ["AMSmath.js", "AMSsymbols.js"] },
  // The package ships the STIX-Web web fonts only: use them, never a font from the network.
  "HTML-CSS": { availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null },
  menuSettings: { zoom: "None" },
  showMathMenu: false,
  messageStyle: "none",
};
// Re-typeset after material's instant navigation swaps the page content.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => {
    if (window.MathJax && MathJax.Hub) MathJax.Hub.Queue(["Typeset", MathJax.Hub]);
  });
}
