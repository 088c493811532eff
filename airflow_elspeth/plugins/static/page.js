// The one script of the Elspeth audit pages, inlined in each page's <head> and allowed by its hash
// (Content-Security-Policy). The pages work without it; it does two things:
// 1. Airflow's theme: Airflow's UI keeps the user's choice in localStorage "theme" (next-themes:
//    light, dark or system). A page opened on its own follows it; "system" or nothing leaves
//    prefers-color-scheme in charge. Airflow's tab frame inherits the theme anyway.
// 2. The address of a DAG run's or task instance's "Fork/join audit" tab follows the page shown in
//    it, the way Airflow's UI does for its menu views: <tab>/plugin/<route><this page's path>, so
//    the address can be bookmarked and shared. A tab opened on such an address shows that page.
(function () {
  "use strict";
  var root = document.documentElement;

  function applyTheme() {
    var theme = null;
    try {
      theme = window.localStorage.getItem("theme");
    } catch (err) {
      theme = null; // storage blocked: prefers-color-scheme decides
    }
    if (theme === "light" || theme === "dark") {
      root.setAttribute("data-theme", theme);
    } else {
      root.removeAttribute("data-theme");
    }
  }
  applyTheme();
  window.addEventListener("storage", function (event) {
    if (event.key === "theme" || event.key === null) {
      applyTheme();
    }
  });

  var frame = null;
  var outer = null;
  try {
    frame = window.frameElement;
    outer = window.parent.location;
  } catch (err) {
    return; // not framed by Airflow's own origin
  }
  if (!frame || window.parent === window) {
    return;
  }
  var scope = root.getAttribute("data-scope") || "";
  // A DAG run's or task instance's tab: <...>/dags/<dag>/runs/<run>[/tasks/<task>[/mapped/<n>]]
  // /plugin/<route>, then the page it names, if any. A menu view (<base>/plugin/<route>) is not
  // one: Airflow's UI keeps its address itself.
  var TAB = /^(.*?\/dags\/[^\/]+\/runs\/[^\/]+(?:\/tasks\/[^\/]+(?:\/mapped\/[^\/]+)?)?\/plugin\/[^\/]+)(\/.*)?$/;

  // {address: the tab's own address, page: the page its address names, or ""}
  function tab() {
    var found = outer.pathname.match(TAB);
    return found ? {address: found[1], page: found[2] || ""} : null;
  }
  if (!tab()) {
    return;
  }

  function shown() {
    return location.pathname + location.search + location.hash;
  }
  function linked() {
    var page = tab().page;
    return page ? page + outer.search + outer.hash : null;
  }
  function entry() {
    // What Airflow's UI frames when the tab opens.
    var src = new URL(frame.getAttribute("src") || "", location.href);
    return src.pathname + src.search;
  }
  function inScope(path) {
    // A page of this tab's DAG run only, after the path is normalised ("..", encodings).
    if (!scope) {
      return null;
    }
    var target = new URL(path, location.href);
    var rest = target.pathname.slice(scope.length);
    var inside = target.origin === location.origin && target.pathname.indexOf(scope) === 0 &&
      (rest === "" || rest.charAt(0) === "/");
    return inside ? target.pathname + target.search + target.hash : null;
  }
  function follow() {
    var here = shown();
    var want = here === entry() ? null : here;
    if (want !== linked()) {
      window.parent.history.replaceState(
        window.parent.history.state, "", want === null ? tab().address : tab().address + want
      );
    }
  }

  if (!frame.hasAttribute("data-elspeth-opened")) {
    // The tab's first page: open the page its address names, if any.
    frame.setAttribute("data-elspeth-opened", "");
    var named = linked();
    var target = named === null ? null : inScope(named);
    if (target !== null && target !== shown()) {
      location.replace(target);
      return;
    }
  }
  follow();
  window.addEventListener("hashchange", follow);
})();
