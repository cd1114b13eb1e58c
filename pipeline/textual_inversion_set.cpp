// Which textual-inversion embeddings a model may use and where a prompt calls them
// (textual_inversion_set.h), and the Model members that hand them over.
#include "pipeline/textual_inversion_set.h"

#include <algorithm>
#include <cctype>

#include "pipeline/model_impl.h"

namespace sdserve::pipeline {
namespace {

std::string dims_text(const std::vector<int>& dims) {
  std::string out;
  for (const int d : dims) out += (out.empty() ? "" : " and ") + std::to_string(d);
  return out;
}

// Why an embedding of `info.dims` cannot feed encoders of `dims`; "" when it can.
std::string dims_problem(const TextualInversionInfo& info, const std::vector<int>& dims) {
  if (info.dims == dims) return "";
  if (dims.size() == 2 && info.dims.size() == 1)
    return "an embedding for one text encoder (" + std::to_string(info.dims[0]) +
           " values a vector: SD 1.x or 2.x); SDXL needs an embedding with clip_l and clip_g "
           "vectors";
  if (dims.size() == 1 && info.dims.size() == 2)
    return "an SDXL embedding (clip_l and clip_g); this model has one text encoder";
  return "its vectors have " + dims_text(info.dims) + " values but this model's text encoder" +
         (dims.size() == 2 ? "s take " : " takes ") + dims_text(dims) +
         ": an embedding for another model family";
}

}  // namespace

TextualInversionSet::TextualInversionSet(std::vector<TextualInversionPtr> list,
                                         const std::vector<const ClipTokenizer*>& tokenizers,
                                         const std::vector<int>& dims)
    : names_(tokenizers.size()), longest_(tokenizers.size(), 1) {
  list.erase(std::remove(list.begin(), list.end(), nullptr), list.end());
  // By name as A1111 lists them (ignoring case), then exactly, so the order never depends on
  // the caller's.
  const auto lower = [](std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  };
  std::stable_sort(list.begin(), list.end(), [&](const auto& a, const auto& b) {
    const auto la = lower(a->info().name), lb = lower(b->info().name);
    return la != lb ? la < lb : a->info().name < b->info().name;
  });
  const size_t room = static_cast<size_t>(TextualInversion::kMaxVectors);
  std::map<std::string, std::string> seen;  // name -> the path of the first file of that name
  for (const auto& ti : list) {
    const auto& info = ti->info();
    const auto skip = [&](const std::string& reason) { skipped_.push_back({info, reason}); };
    if (const auto [first, added] = seen.emplace(info.name, info.path); !added) {
      skip("another embedding has the name '" + info.name + "' (" + first->second + ")");
      continue;
    }
    if (const auto problem = dims_problem(info, dims); !problem.empty()) {
      skip(problem);
      continue;
    }
    // A1111 matches the name's tokens (the tokenizer's lower-cased reading) in the prompt's.
    std::vector<std::vector<int32_t>> ids;
    std::string problem;
    for (size_t k = 0; k < tokenizers.size() && problem.empty(); ++k) {
      ids.push_back(tokenizers[k]->tokenize(info.name, room + 1));
      const auto& own = ids.back();
      if (own.empty()) {
        problem = "its name has no tokens a prompt could call it by";
      } else if (own.size() > room) {
        problem = "its name is longer than a prompt chunk";
      } else if (const auto same = names_[k].find(own[0]); same != names_[k].end()) {
        for (const auto& other : same->second)
          if (other.ids == own)
            problem = "its name reads as the same tokens as the name of '" +
                      usable_[other.index]->info().name + "', which a prompt calls instead";
      }
    }
    if (!problem.empty()) {
      skip(problem);
      continue;
    }
    const size_t index = usable_.size();
    usable_.push_back(ti);
    by_name_[info.name] = index;
    for (size_t k = 0; k < tokenizers.size(); ++k) {
      auto& same_start = names_[k][ids[k][0]];
      same_start.push_back({ids[k], index});
      std::stable_sort(same_start.begin(), same_start.end(),
                       [](const Name& a, const Name& b) { return a.ids.size() > b.ids.size(); });
      longest_[k] = std::max(longest_[k], ids[k].size());
    }
  }
}

FindEmbeddingFn TextualInversionSet::finder(size_t k) const {
  if (usable_.empty()) return {};
  return [this, k](const std::vector<int32_t>& tokens, size_t position) {
    EmbeddingMatch match;
    const auto it = names_[k].find(tokens[position]);
    if (it == names_[k].end()) return match;
    for (const auto& name : it->second) {
      if (tokens.size() - position < name.ids.size() ||
          !std::equal(name.ids.begin(), name.ids.end(),
                      tokens.begin() + static_cast<std::ptrdiff_t>(position)))
        continue;
      match.index = name.index;
      match.name_tokens = name.ids.size();
      match.vectors = static_cast<size_t>(usable_[name.index]->info().vectors);
      return match;
    }
    return match;
  };
}

void TextualInversionSet::place(const TokenChunk& chunk, int32_t vocab, size_t first,
                                TextInput* in) const {
  for (const auto& at : chunk.embeddings) {
    const auto& info = usable_.at(at.index)->info();
    int32_t row = 0;
    auto used = in->embeddings.begin();
    for (; used != in->embeddings.end() && used->name != info.name; ++used)
      row += usable_.at(by_name_.at(used->name))->info().vectors;
    if (used == in->embeddings.end()) in->embeddings.push_back({info.name, info.sha256});
    // A literal chunk may have cut the last embedding's vectors.
    const size_t end = std::min(chunk.tokens.size(), at.offset + static_cast<size_t>(info.vectors));
    for (size_t i = at.offset; i < end; ++i)
      in->ids.at(first + i) = vocab + row + static_cast<int32_t>(i - at.offset);
  }
}

void TextualInversionSet::append_rows(TextInput* in, size_t k, int32_t vocab,
                                      std::vector<float>* table) const {
  if (in->embeddings.empty()) return;
  const auto dim = usable_.at(by_name_.at(in->embeddings[0].name))->info().dims.at(k);
  const auto first_row = static_cast<int32_t>(table->size() / static_cast<size_t>(dim));
  for (auto& id : in->ids)
    if (id >= vocab) id += first_row;
  for (const auto& used : in->embeddings) {
    const auto& v = usable_.at(by_name_.at(used.name))->vectors(k);
    table->insert(table->end(), v.begin(), v.end());
  }
}

// --- Model ---------------------------------------------------------------------------------

std::shared_ptr<const TextualInversionSet> Model::Impl::textual_inversion_set() const {
  std::lock_guard<std::mutex> lock(textual_inversions_mutex);
  return textual_inversions;
}

void Model::set_textual_inversions(std::vector<TextualInversionPtr> list) {
  std::vector<const ClipTokenizer*> tokenizers{impl_->tokenizer.get()};
  std::vector<int> dims{static_cast<int>(impl_->text_encoder->config().hidden_size)};
  if (impl_->text_encoder_2) {
    tokenizers.push_back(impl_->tokenizer_2.get());
    dims.push_back(static_cast<int>(impl_->text_encoder_2->config().hidden_size));
  }
  auto set = std::make_shared<const TextualInversionSet>(std::move(list), tokenizers, dims);
  std::lock_guard<std::mutex> lock(impl_->textual_inversions_mutex);
  impl_->textual_inversions = std::move(set);
}

std::vector<TextualInversionInfo> Model::textual_inversions() const {
  std::vector<TextualInversionInfo> out;
  if (const auto set = impl_->textual_inversion_set())
    for (const auto& ti : set->usable()) out.push_back(ti->info());
  return out;
}

std::vector<SkippedTextualInversion> Model::skipped_textual_inversions() const {
  const auto set = impl_->textual_inversion_set();
  return set ? set->skipped() : std::vector<SkippedTextualInversion>{};
}

}  // namespace sdserve::pipeline
