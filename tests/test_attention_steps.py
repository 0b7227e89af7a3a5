"""The chapter-3 attention steps equal the book's classes on the same weights, and the last step equals
gptlab's production CausalSelfAttention."""
import pytest
import torch
from llms_from_scratch import ch03 as book

from gptlab import attention_steps as steps
from gptlab.errors import GptlabError

# The book's running example, "Your journey starts with one step", as 3-d embeddings (section 3.3.1).
INPUTS = torch.tensor([[0.43, 0.15, 0.89], [0.55, 0.87, 0.66], [0.57, 0.85, 0.64],
                       [0.22, 0.58, 0.33], [0.77, 0.25, 0.10], [0.05, 0.80, 0.55]])


def test_simple_self_attention_gives_the_books_numbers():
    context = steps.simple_self_attention(INPUTS)
    # printed in the book's section 3.3.2 (all context vectors) to 4 decimals
    expected = torch.tensor([[0.4421, 0.5931, 0.5790], [0.4419, 0.6515, 0.5683], [0.4431, 0.6496, 0.5671],
                             [0.4304, 0.6298, 0.5510], [0.4671, 0.5910, 0.5266], [0.4177, 0.6503, 0.5645]])
    torch.testing.assert_close(context, expected, atol=1e-4, rtol=0)
    # and the book's loop form (section 3.3.1): score by dot product, softmax, weighted sum
    for i, query in enumerate(INPUTS):
        weights = torch.softmax(torch.stack([query @ x for x in INPUTS]), dim=0)
        torch.testing.assert_close(context[i], sum(w * x for w, x in zip(weights, INPUTS)))


def _copy(ours: torch.nn.Module, theirs: torch.nn.Module) -> torch.nn.Module:
    ours.load_state_dict(theirs.state_dict())  # strict: the same names and shapes, buffers included
    return ours


def test_the_same_seed_builds_the_books_weights():
    # the classes create their parameters in the book's order, so the book's seeded examples carry over
    for make in (lambda m: m.SelfAttention_v1(3, 2), lambda m: m.SelfAttention_v2(3, 2),
                 lambda m: m.MultiHeadAttention(3, 4, 6, 0.0, num_heads=2)):
        torch.manual_seed(123)
        theirs = make(book)
        torch.manual_seed(123)
        ours = make(steps)
        for (name, a), (_, b) in zip(theirs.state_dict().items(), ours.state_dict().items(), strict=True):
            torch.testing.assert_close(b.to(a.dtype), a, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_self_attention_v1_and_v2_equal_the_book(qkv_bias):
    x = torch.randn(7, 5)
    v1 = book.SelfAttention_v1(5, 3)
    torch.testing.assert_close(_copy(steps.SelfAttention_v1(5, 3), v1)(x), v1(x), rtol=0, atol=0)
    v2 = book.SelfAttention_v2(5, 3, qkv_bias=qkv_bias)
    ours = _copy(steps.SelfAttention_v2(5, 3, qkv_bias=qkv_bias), v2)
    torch.testing.assert_close(ours(x), v2(x), rtol=0, atol=0)
    if not qkv_bias:  # the book's exercise 3.1: v1 holding v2's weights, transposed, is v2
        as_v1 = steps.SelfAttention_v1(5, 3)
        with torch.no_grad():
            for name in ("W_query", "W_key", "W_value"):
                getattr(as_v1, name).copy_(getattr(ours, name).weight.T)
        torch.testing.assert_close(as_v1(x), ours(x))


def _attention_classes(d_in, d_out, context_length, dropout, num_heads, qkv_bias):
    """(ours, the book's) with the book's weights copied into ours, for every batched step."""
    args = (d_in, d_out, context_length, dropout)
    pairs = [(steps.CausalAttention(*args, qkv_bias=qkv_bias), book.CausalAttention(*args, qkv_bias=qkv_bias)),
             (steps.MultiHeadAttentionWrapper(*args, num_heads, qkv_bias),
              book.MultiHeadAttentionWrapper(*args, num_heads, qkv_bias))]
    if d_out % num_heads == 0:
        pairs.append((steps.MultiHeadAttention(*args, num_heads, qkv_bias),
                      book.MultiHeadAttention(*args, num_heads, qkv_bias)))
    return [(_copy(ours, theirs), theirs) for ours, theirs in pairs]


@pytest.mark.parametrize("d_in, d_out, T, context_length, num_heads, qkv_bias",
                         [(3, 2, 6, 6, 2, False), (8, 12, 5, 9, 3, True), (16, 16, 16, 16, 4, False)])
def test_causal_and_multi_head_attention_equal_the_book_in_eval(d_in, d_out, T, context_length, num_heads, qkv_bias):
    x = torch.randn(2, T, d_in)
    for ours, theirs in _attention_classes(d_in, d_out, context_length, 0.3, num_heads, qkv_bias):
        ours.eval(), theirs.eval()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0, msg=type(ours).__name__)


def test_dropout_masks_match_the_book_under_the_same_seed():
    # Both apply nn.Dropout to the attention weights, once per head, in the same order: one seed, one mask.
    x = torch.randn(2, 6, 4)
    for ours, theirs in _attention_classes(4, 4, 6, 0.5, 2, False):
        ours.train(), theirs.train()
        torch.manual_seed(7)
        expected = theirs(x)
        torch.manual_seed(7)
        got = ours(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=type(ours).__name__)
        torch.manual_seed(8)
        assert not torch.equal(ours(x), expected)  # another seed, another mask: dropout is really on


def test_causal_weights_are_zero_above_the_diagonal_and_rows_sum_to_one():
    attn = steps.CausalAttention(3, 2, context_length=6, dropout=0.0)
    weights = attn.attention_weights(INPUTS.unsqueeze(0))[0]  # (6, 6)
    assert torch.equal(weights.triu(diagonal=1), torch.zeros(6, 6))
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))
    mha = steps.MultiHeadAttention(3, 4, 6, 0.0, num_heads=2)
    assert mha.attention_weights(INPUTS.unsqueeze(0)).shape == (1, 2, 6, 6)


def test_multi_head_attention_is_the_wrapper_with_split_weights():
    # head h of MultiHeadAttention = a CausalAttention holding rows h*hd:(h+1)*hd of each projection
    mha = steps.MultiHeadAttention(5, 6, 8, 0.0, num_heads=3, qkv_bias=True).eval()
    wrapper = steps.MultiHeadAttentionWrapper(5, 2, 8, 0.0, num_heads=3, qkv_bias=True).eval()
    with torch.no_grad():
        for h, head in enumerate(wrapper.heads):
            rows = slice(2 * h, 2 * h + 2)
            for name in ("W_query", "W_key", "W_value"):
                getattr(head, name).weight.copy_(getattr(mha, name).weight[rows])
                getattr(head, name).bias.copy_(getattr(mha, name).bias[rows])
    x = torch.randn(2, 8, 5)
    torch.testing.assert_close(mha(x), mha.out_proj(wrapper(x)))


@pytest.mark.parametrize("C, num_heads, T, qkv_bias", [(12, 3, 7, True), (32, 4, 16, False), (64, 8, 33, True)])
def test_the_last_step_equals_gptlabs_causal_self_attention(C, num_heads, T, qkv_bias):
    theirs = book.MultiHeadAttention(C, C, T, 0.1, num_heads, qkv_bias).eval()
    mha = _copy(steps.MultiHeadAttention(C, C, T, 0.1, num_heads, qkv_bias), theirs).eval()
    production = steps.as_causal_self_attention(mha).eval()
    assert production.c_attn.weight.shape == (3 * C, C) and (production.c_attn.bias is not None) == qkv_bias
    x = torch.randn(3, T, C)
    with torch.no_grad():
        torch.testing.assert_close(production(x), mha(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(production(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_as_causal_self_attention_needs_one_width():
    with pytest.raises(GptlabError, match="d_in"):
        steps.as_causal_self_attention(steps.MultiHeadAttention(3, 4, 6, 0.0, num_heads=2))
    with pytest.raises(GptlabError, match="divisible"):
        steps.MultiHeadAttention(4, 6, 6, 0.0, num_heads=4)
