// Keyboard shortcuts for the labeling pages. A control with data-key="x" is clicked (or, for a
// text box, focused) when x is pressed; rankings take the number keys. Loaded from /static only:
// the Content-Security-Policy allows no inline script.
(function () {
  "use strict";

  function isTyping(element) {
    if (!element) return false;
    const tag = element.tagName;
    return tag === "TEXTAREA" || tag === "INPUT" || tag === "SELECT" || element.isContentEditable;
  }

  // ---- rankings: press the shown numbers from best to worst -------------------------------
  const rankForm = document.querySelector('form[data-task="rank"]');
  let picks = []; // shown positions, best first

  function rankSelects() {
    return Array.from(rankForm.querySelectorAll("select[name^='rank_']"));
  }

  function showRanking() {
    const selects = rankSelects();
    selects.forEach(function (select, position) {
      const rank = picks.indexOf(position);
      select.value = rank >= 0 ? String(rank + 1) : "";
      select.closest(".completion").classList.toggle("ranked", rank >= 0);
    });
    const output = rankForm.querySelector(".ranking");
    output.textContent = picks.length
      ? picks.map(function (p) { return String(p + 1); }).join(" > ")
      : "none yet";
  }

  function pick(position) {
    const size = rankSelects().length;
    if (position < 0 || position >= size || picks.indexOf(position) >= 0) return;
    picks.push(position);
    if (picks.length === size - 1) {
      // The last one left is the worst: no need to press it.
      for (let p = 0; p < size; p++) if (picks.indexOf(p) < 0) picks.push(p);
    }
    showRanking();
  }

  // With 10 or more responses a number can take two keys: "1" waits a moment for a second digit
  // ("1" then "2" picks 12), unless no number it could start is on the page.
  let typed = "";
  let typedTimer = null;

  function commitTyped() {
    clearTimeout(typedTimer);
    const number = parseInt(typed, 10);
    typed = "";
    if (number >= 1) pick(number - 1);
  }

  function typeDigit(digit) {
    clearTimeout(typedTimer);
    typed += digit;
    if (parseInt(typed, 10) * 10 > rankSelects().length) commitTyped();
    else typedTimer = setTimeout(commitTyped, 700);
  }

  if (rankForm) {
    rankSelects().forEach(function (select) {
      select.addEventListener("change", function () {
        // Mouse users set ranks in the boxes: rebuild the picks from them.
        const ranked = rankSelects()
          .map(function (s, position) { return { position: position, rank: parseInt(s.value, 10) }; })
          .filter(function (r) { return !isNaN(r.rank); })
          .sort(function (a, b) { return a.rank - b.rank; });
        picks = ranked.map(function (r) { return r.position; });
        showRanking();
      });
    });
    const unrank = rankForm.querySelector('[data-action="unrank"]');
    unrank.addEventListener("click", function () {
      picks.pop();
      showRanking();
    });
  }

  // ---- one submission per form ---------------------------------------------------------------
  // The server stores an answer once whatever happens (idempotency key); this only stops a
  // second click from sending a needless second request.
  document.querySelectorAll("form").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (form.dataset.busy) {
        event.preventDefault();
        return;
      }
      form.dataset.busy = "1";
    });
  });
  window.addEventListener("pageshow", function () {
    document.querySelectorAll("form").forEach(function (form) { delete form.dataset.busy; });
  });

  // ---- the key handler -----------------------------------------------------------------------
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    if (isTyping(document.activeElement)) {
      if (event.key === "Escape") document.activeElement.blur();
      return;
    }
    const key = event.key.toLowerCase();
    if (rankForm && /^[0-9]$/.test(key)) {
      event.preventDefault();
      typeDigit(key);
      return;
    }
    if (rankForm && key === "enter" && !rankForm.checkValidity()) {
      event.preventDefault();
      rankForm.reportValidity();
      return;
    }
    const target = document.querySelector('[data-key="' + CSS.escape(key) + '"]');
    if (!target) return;
    event.preventDefault();
    if (isTyping(target)) target.focus();
    else target.click();
  });
})();
