// Follow Airflow's light/dark mode: the Airflow UI (next-themes) puts "dark" or "light" on its <html>;
// these pages run in its iframe on the same origin, so they can read it and watch it change.
// Standalone (no Airflow parent) they follow the browser's preference.
(function () {
  "use strict";
  var root = document.documentElement;
  function parentRoot() {
    try {
      if (window.parent !== window) return window.parent.document.documentElement;
    } catch (e) { /* another origin: fall through */ }
    return null;
  }
  function apply() {
    var p = parentRoot();
    var dark = p ? p.classList.contains("dark") : window.matchMedia("(prefers-color-scheme: dark)").matches;
    root.classList.toggle("dark", dark);
    root.classList.toggle("embedded", !!p);
  }
  apply();
  var p = parentRoot();
  if (p) new MutationObserver(apply).observe(p, { attributes: true, attributeFilter: ["class"] });
})();
