"""Answer extraction, numeric equivalence and the R1 format reward."""

from __future__ import annotations

import pytest

from distill.data.gsm8k import gold_answer
from teachers.verify import answers_match, extract_answer, format_ok, parse_number, reward

# Final lines of real GSM8K solutions (test split) and the gold answer after ####.
GSM8K_SOLUTIONS = [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18", "18"),
    ("So the total amount of fabric is 2+1=<<2+1=3>>3 bolts of fabric\n#### 3", "3"),
    ("So he runs 9*60=<<9*60=540>>540 meters\n#### 540", "540"),
    ("He sells a total of 3 + 4 + 0 = <<3+4+0=7>>7 DVDs.\n#### 7", "7"),
    ("Thus, the candle will be 2 * 4 = <<2*4=8>>8 centimeters shorter.\n#### 8", "8"),
    ("3 * (16.50 + 22.50 + 42) = $<<3*(16.50+22.50+42)=243>>243\nMishka spent $243 on clothing.\n#### 243", "243"),
    ("That means he spends 5*7=<<5*7=35>>35 hours per week\n#### 35", "35"),
    ("That means it takes 30/6=<<30/6=5>>5 hours to get back\n#### 5", "5"),
    ("Jean can fill up 28 / 2 = <<28/2=14>>14 bags with lollipops\n#### 14", "14"),
    ("Bailey started with $100 - $40 = $<<100-40=60>>60\n#### 60", "60"),
    ("In total, that means Johnny picked up 500 + 1500+ 125= <<500+1500+125=2125>>2125 blocks\n#### 2,125",
     "2125"),
    ("So in total he made 109,200+5,000=$<<109200+5000=114200>>114,200\n#### 114,200", "114200"),
    ("So his total cost is 264,000+12,000=$<<264000+12000=276000>>276,000\n#### 276,000", "276000"),
    ("Sue consumed 28*200=<<28*200=5600>>5,600 more calories.\n#### 5,600", "5600"),
    ("-30/3 = <<-30/3=-10>>-10 degrees\nThe average highest temperature is -10 degrees Fahrenheit.\n#### -10",
     "-10"),
]


@pytest.mark.parametrize("solution,gold", GSM8K_SOLUTIONS)
def test_gsm8k_solutions_extract_and_match(solution, gold):
    assert gold_answer(solution) == gold
    pred = extract_answer(solution)
    assert answers_match(pred, gold), (pred, gold)
    assert answers_match(pred, solution)  # a full solution works as the gold side too
    assert not answers_match(pred, str(int(gold) + 1))


@pytest.mark.parametrize("text,expected", [
    ("The answer is 42.", "42"),
    ("so the answer is: $1,234.", "1234"),
    ("Answer: 7 apples", "7"),
    ("The answer is -5", "-5"),
    ("we get 3.50 dollars in the end", "3.5"),
    ("\\boxed{\\frac{1}{2}}", "1/2"),
    ("thus \\boxed{{12}} is it", "12"),
    ("first 3 then 4 then finally 18 cookies.", "18"),
    ("It costs $2,000.", "2000"),
    ("The price dropped by 25%.", "25"),
    ("<think>3 + 4 = 7, maybe 8</think>\nThe answer is 7.", "7"),
    ("<think>12 * 2 = 24</think>\n#### 24", "24"),
    ("<think>I think it is 5 then 9</think>", "9"),  # nothing after </think>: fall back to the reasoning
    ("pages 3-5 were read, total 10", "10"),
    ("The answer is 0.5", "1/2"),
    ("The answer is 3.0", "3"),
])
def test_tricky_extraction(text, expected):
    pred = extract_answer(text)
    assert pred is not None
    assert answers_match(pred, expected), (text, pred, expected)


def test_hyphen_is_not_a_minus_sign():
    assert parse_number(extract_answer("pages 3-5")) == 5


@pytest.mark.parametrize("text", ["", None, "I do not know.", "<think>hmm</think> no idea"])
def test_no_number(text):
    pred = extract_answer(text)
    assert pred is None or parse_number(pred) is None
    assert not answers_match(pred, "3")


@pytest.mark.parametrize("pred,gold,same", [
    ("1,000", "1000", True), ("$18", "18", True), ("18.", "18", True), ("18.00", "18", True),
    ("50%", "50", True), ("7 apples", "7", True), ("-3", "3", False), ("0.25", "1/4", True),
    ("\\frac{3}{4}", "0.75", True), ("\\dfrac{3}{4}", "3/4", True), ("12", "1,2", False),
    ("\\text{12 cm}", "12", True), ("3/0", "3", False), (None, "3", False), ("x+1", "x + 1", True),
    ("5", "6", False), ("1.5", "1.50", True), ("2.125", "2,125", False),
])
def test_answers_match(pred, gold, same):
    assert answers_match(pred, gold) is same


@pytest.mark.parametrize("text,ok", [
    ("<think>3 + 4 = 7</think>\nThe answer is 7.", True),
    ("  <think>\nreason\n</think>7", True),
    ("<think>reason</think>", False),  # no answer
    ("<think>  </think> 7", False),  # empty reasoning
    ("The answer is 7.", False),  # no tags
    ("intro <think>reason</think> 7", False),  # text before the block
    ("<think>a</think><think>b</think> 7", False),  # two blocks
    ("</think>reason<think> 7", False),  # reversed
    ("<think>reason 7", False),  # never closed
])
def test_format_ok(text, ok):
    assert format_ok(text) is ok


def test_reward():
    assert reward("<think>2 * 4 = 8</think>\nThe answer is 8.", "8") == {"accuracy": 1.0, "format": 1.0}
    assert reward("The answer is 8.", "#### 8") == {"accuracy": 1.0, "format": 0.0}
    assert reward("<think>2 * 4 = 9</think> 9", "8") == {"accuracy": 0.0, "format": 1.0}
